"""Undoable commands on the project's one configuration (QUndoStack: Ctrl+Z / Ctrl+Shift+Z)."""
from __future__ import annotations

import copy

from PySide6.QtGui import QUndoCommand


class BlockEditCommand(QUndoCommand):
    """New specs for some blocks (in place); structural edits also drop those blocks' calibrated
    tensors, which undo puts back."""

    def __init__(self, project, text: str, new_specs: dict, drop_tensors: set) -> None:
        super().__init__(text)
        self.project = project
        self.new_specs = {k: copy.deepcopy(s) for k, s in new_specs.items()}
        self.old_specs = {k: copy.deepcopy(project.config.blocks[k]) for k in new_specs}
        self.drop = set(drop_tensors)
        self.removed: dict = {}

    def redo(self) -> None:
        cfg = self.project.config
        for k, spec in self.new_specs.items():
            cfg.blocks[k] = copy.deepcopy(spec)
        self.removed = {}
        for k in self.drop:
            prefix = f"b{k}."
            for key in [key for key in cfg.tensors if key.startswith(prefix)]:
                self.removed[key] = cfg.tensors.pop(key)
        self.project._blocks_touched(sorted(self.new_specs))

    def undo(self) -> None:
        cfg = self.project.config
        for k, spec in self.old_specs.items():
            cfg.blocks[k] = copy.deepcopy(spec)
        cfg.tensors.update(self.removed)
        self.removed = {}
        self.project._blocks_touched(sorted(self.old_specs))


class ReplaceConfigCommand(QUndoCommand):
    """Swap the whole configuration object (calibration results, imported settings)."""

    def __init__(self, project, new_config, text: str) -> None:
        super().__init__(text)
        self.project = project
        self.old = project.config
        self.new = new_config

    def redo(self) -> None:
        self.project._install(self.new)

    def undo(self) -> None:
        self.project._install(self.old)
