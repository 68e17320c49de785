"""The open document: one model, ONE configuration object, its file, and the undo stack.

Every change to the configuration goes through an undoable command (:mod:`dupstudio.gui.undo`):
cell edits mutate the blocks of ``project.config`` in place; calibration results, "New" and "Open"
replace the object. Views (the layer table, the totals, the plots) read ``project.config``
directly and listen to the signals below; nothing copies it, except :func:`snapshot`, which hands
an immutable copy of the block specs to a worker job (so the GUI may keep editing while the job runs).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Iterable, Optional

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QUndoStack

from dupstudio.core import config as C
from dupstudio.core.jobs import DupstudioError

EDIT_FIELDS = ("replicas", "mode", "bits", "group_size", "strategy", "init", "granularity", "gains",
               "residual_gain")
#: edits that keep a block's calibrated tensors (everything else invalidates them)
KEEPS_CALIBRATION = ("gains", "residual_gain")


def snapshot(cfg: C.Config) -> C.Config:
    """A copy safe to hand to the worker: block specs and metadata deep-copied, the calibrated
    tensors dict copied shallowly (the arrays themselves are never modified in place, and copying
    them would touch MLX on the GUI thread)."""
    new = copy.copy(cfg)
    new.model = copy.deepcopy(cfg.model)
    new.defaults = copy.deepcopy(cfg.defaults)
    new.embedding = copy.deepcopy(cfg.embedding)
    new.blocks = copy.deepcopy(cfg.blocks)
    new.provenance = copy.deepcopy(cfg.provenance)
    new.results = copy.deepcopy(cfg.results)
    new.tensors = dict(cfg.tensors)
    return new


def block_tensor_keys(cfg: C.Config, k: int) -> list:
    prefix = f"b{k}."
    return [key for key in cfg.tensors if key.startswith(prefix)]


def edited_spec(cfg: C.Config, k: int, field: str, value: Any) -> Optional[C.BlockSpec]:
    """Block k's spec after setting ``field`` to ``value`` (None when the edit does not apply to
    this block, e.g. a replica init on a K = 1 block). Raises DupstudioError for bad values."""
    if field not in EDIT_FIELDS:
        raise DupstudioError(f"unknown field {field!r}")
    spec = copy.deepcopy(cfg.blocks[k])
    d = cfg.defaults
    if field == "replicas":
        kk = int(value)
        old = spec.replicas
        if kk == old:
            return None
        tmpl = copy.deepcopy(spec.replica[1]) if old > 1 else None
        spec.set_replicas(kk, spec.mode)
        if tmpl is not None:
            for r in spec.replica[old:]:
                r.init, r.init_args, r.granularity = tmpl.init, dict(tmpl.init_args), tmpl.granularity
    elif field == "mode":
        if value not in C.MODES:
            raise DupstudioError(f"mode must be serial or parallel, not {value!r}")
        if value == spec.mode:
            return None
        spec.set_replicas(spec.replicas, value)
    elif field in ("bits", "group_size", "strategy"):
        if field == "bits":
            value = None if value in (None, "") else int(value)
        elif field == "group_size":
            value = None if value in (None, "") else int(value)
        default = getattr(d, field)
        new = None if value == default else value
        if getattr(spec, field) == new:
            return None
        setattr(spec, field, new)
        if field == "strategy":
            spec.strategy_args = None
        spec.calibration = None
        spec.gains = C.default_gains(spec.replicas, spec.mode)
        spec.residual_gain = 1.0
    elif field in ("init", "granularity"):
        if spec.replicas < 2:
            return None
        allowed = C.INITS if field == "init" else C.GRANULARITIES
        if value not in allowed:
            raise DupstudioError(f"{field} must be one of {', '.join(allowed)}, not {value!r}")
        if all(getattr(r, field) == value for r in spec.replica[1:]):
            return None
        for r in spec.replica[1:]:
            setattr(r, field, value)
            if field == "init":
                r.init_args = {}
        spec.calibration = None
        spec.gains = C.default_gains(spec.replicas, spec.mode)
        spec.residual_gain = 1.0
    elif field == "gains":
        gains = parse_gains(value, spec.replicas, spec.mode)
        if [float(x) for x in spec.gains] == gains:
            return None
        spec.gains = gains
    elif field == "residual_gain":
        beta = parse_number(value, "β", *EDIT_RANGES["residual_gain"])
        if float(spec.residual_gain) == beta:
            return None
        spec.residual_gain = beta
    return spec


#: the values a person may type into the α/w and β cells (calibration keeps them near [0, 2] too)
EDIT_RANGES = {"gains": (0.0, 2.0), "residual_gain": (0.0, 2.0)}


def parse_number(value: Any, name: str, lo: float, hi: float) -> float:
    try:
        x = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise DupstudioError(f"{name} must be a number, not “{value}”") from None
    if not math.isfinite(x):
        raise DupstudioError(f"{name} must be a finite number")
    if not lo <= x <= hi:
        raise DupstudioError(f"{name} must be between {lo:g} and {hi:g} (got {x:g})")
    return x


def parse_gains(value: Any, k: int, mode: str = "parallel") -> list:
    """The K gains typed into a cell: "1, 0.5". Serial mode: the first is the primary replica's
    and stays 1 (anything else is refused, not silently replaced)."""
    name = "α" if mode == "serial" else "w"
    if isinstance(value, str):
        parts = [p for p in value.replace(";", ",").replace(" ", ",").split(",") if p.strip()]
    else:
        parts = list(value)
    if len(parts) != k:
        example = ", ".join(["1"] + ["0.5"] * (k - 1)) if mode == "serial" else ", ".join([f"{1 / k:g}"] * k)
        raise DupstudioError(f"this block has K = {k} replicas, so {k} value{'s' if k != 1 else ''} of {name} "
                             f"{'are' if k != 1 else 'is'} needed, e.g. “{example}” (got {len(parts)})")
    gains = [parse_number(p, name, -math.inf, math.inf) for p in parts]
    if mode == "serial" and gains[0] != 1.0:
        raise DupstudioError(f"in serial mode the first α belongs to the primary replica and is fixed at 1 "
                             f"(got {gains[0]:g}); write “1, {', '.join(f'{g:g}' for g in gains[1:])}”")
    lo, hi = EDIT_RANGES["gains"]
    return [parse_number(g, name, lo, hi) for g in gains]


def common_group_sizes(shape: dict) -> list:
    from dupstudio.core import quant as Q

    rows = [shape["hidden_size"], shape["intermediate_size"], shape["num_heads"] * shape["head_dim"]]
    return [g for g in Q.GROUP_SIZES if all(r % g == 0 for r in rows)]


def config_summary(cfg: C.Config) -> str:
    """One line: bits/group/strategy, replica counts, calibration."""
    d = cfg.defaults
    quants = {}
    for k in range(len(cfg.blocks)):
        b, g, s, _ = cfg.block_quant(k)
        quants[(b, g, s)] = quants.get((b, g, s), 0) + 1
    q = ", ".join(f"{b}-bit g{g} {s}" + (f" ×{n}" if len(quants) > 1 else "")
                  for (b, g, s), n in sorted(quants.items(), key=lambda x: -x[1]))
    counts = {}
    for b in cfg.blocks:
        key = (b.replicas, b.mode if b.replicas > 1 else "")
        counts[key] = counts.get(key, 0) + 1
    reps = ", ".join(f"K={kk}{(' ' + m) if m else ''} ×{n}" for (kk, m), n in sorted(counts.items()))
    cal = sum(1 for b in cfg.blocks if b.calibration)
    acc = sum(1 for b in cfg.blocks if b.calibration and b.calibration.get("accepted"))
    out = f"{q} · {reps}"
    if cal:
        out += f" · calibrated {acc}/{len(cfg.blocks)}"
    del d
    return out


# --------------------------------------------------------------------------- roofline glue
def roofline_plans(cfg: C.Config, shape: dict):
    """The configuration as the roofline model's block and embedding plans."""
    from dupstudio.core import roofline as RF

    mats = RF.block_matrices(shape)
    plans = []
    for k, b in enumerate(cfg.blocks):
        bits, g, _, _ = cfg.block_quant(k)
        extra = b.replica[1:]
        values = 0
        if extra and any(r.granularity == "channel" for r in extra):
            tot = 0
            for r in extra:
                for o, i in mats.values():
                    tot += 2 * o * (i // g) if r.granularity == "group" else 2 * o
            values = max(1, round(tot / len(extra)))
        plans.append(RF.BlockPlan(bits=bits, group_size=g, replicas=b.replicas, mode=b.mode,
                                  replica_param_values=values))
    e = cfg.embedding
    embed = RF.EmbedPlan(bits=e.bits or 16, group_size=e.group_size)
    return plans, embed


def predict(cfg: C.Config, shape: dict, profile=None, label: str = "", context: int = 512):
    from dupstudio.core import roofline as RF

    plans, embed = roofline_plans(cfg, shape)
    return RF.predict(shape, plans, profile, embed=embed, context=context, label=label)


def baseline_config(cfg: C.Config) -> C.Config:
    """The same quantization with every block at K = 1 (no calibration tensors)."""
    new = snapshot(cfg)
    new.tensors = {}
    for b in new.blocks:
        b.set_replicas(1, b.mode)
        b.residual_gain = 1.0
    return new


# --------------------------------------------------------------------------- the document
class Project(QObject):
    model_changed = Signal()  # a model was opened (or closed)
    config_replaced = Signal()  # project.config is another object now
    blocks_changed = Signal(list)  # block indices edited in place
    dirty_changed = Signal(bool)
    path_changed = Signal(object)  # Path or None
    metrics_changed = Signal(list)  # block indices whose weight error arrived
    busy_changed = Signal(bool)  # a calibration owns the configuration (table read-only)

    def __init__(self, parent: Optional[QObject] = None) -> None:
        super().__init__(parent)
        self.undo_stack = QUndoStack(self)
        self._attached = True
        self.undo_stack.cleanChanged.connect(self._clean_changed)
        self.loaded = None  # LoadedModel: opaque here; only worker jobs touch its arrays
        self.description: Optional[dict] = None
        self.shape: Optional[dict] = None
        self.config: Optional[C.Config] = None
        self.path: Optional[Path] = None
        self.revision = 0  # bumps on every change (cache key for built models)
        self.block_rev: list = []
        self.metrics: dict = {}  # block -> worker result (see tasks.block_metrics_job)
        self.locked = False

    def _clean_changed(self, clean: bool) -> None:
        if self._attached:
            self.dirty_changed.emit(not clean)

    def detach(self) -> None:
        """Before the window goes: the undo stack, destroyed after this object, emits
        ``cleanChanged`` while it clears itself; nothing may listen then (a Python slot would
        emit on a deleted object and print "Signal source has been deleted" at quit)."""
        if not self._attached:
            return
        self._attached = False
        try:
            self.undo_stack.cleanChanged.disconnect(self._clean_changed)
        except (RuntimeError, TypeError):
            pass

    # ------------------------------------------------------------------ state
    @property
    def dirty(self) -> bool:
        return not self.undo_stack.isClean()

    @property
    def has_model(self) -> bool:
        return self.loaded is not None and self.config is not None

    @property
    def num_blocks(self) -> int:
        return len(self.config.blocks) if self.config is not None else 0

    @property
    def display_name(self) -> str:
        return self.path.name if self.path else "untitled"

    def set_locked(self, locked: bool) -> None:
        if locked != self.locked:
            self.locked = locked
            self.busy_changed.emit(locked)

    # ------------------------------------------------------------------ whole-document changes
    def set_model(self, loaded, description: dict) -> None:
        """A newly opened model, with a fresh default configuration (2-bit g64, K = 1)."""
        from dupstudio.core.model_io import model_shape

        self.loaded, self.description = loaded, description
        self.shape = model_shape(loaded.config)
        g = 64 if 64 in common_group_sizes(self.shape) else common_group_sizes(self.shape)[0]
        cfg = C.new_config(self.shape, source=str(description.get("source", "")),
                           architecture=str(description.get("architecture") or "llama"), group_size=g)
        self.set_config(cfg, None)
        self.model_changed.emit()

    def set_config(self, cfg: C.Config, path: Optional[Path]) -> None:
        """Replace the configuration without undo (New / Open): the stack starts again, clean."""
        self.undo_stack.clear()
        self._install(cfg)
        self.path = Path(path) if path else None
        self.undo_stack.setClean()
        self.path_changed.emit(self.path)
        self.dirty_changed.emit(False)

    def new_config(self, **kw) -> C.Config:
        if self.shape is None:
            raise DupstudioError("open a model first")
        cfg = C.new_config(self.shape, source=str((self.description or {}).get("source", "")), **kw)
        self.set_config(cfg, None)
        return cfg

    def _install(self, cfg: C.Config) -> None:
        self.config = cfg
        self.revision += 1
        self.block_rev = [self.revision] * len(cfg.blocks)
        self.config_replaced.emit()

    def saved_as(self, path: Path, tensors_file: Optional[str]) -> None:
        self.config.tensors_file = tensors_file
        self.path = Path(path)
        self.undo_stack.setClean()
        self.path_changed.emit(self.path)

    # ------------------------------------------------------------------ undoable edits
    def edit_blocks(self, blocks: Iterable[int], field: str, value: Any, text: Optional[str] = None) -> int:
        """Set ``field`` on ``blocks`` as one undoable step. Returns how many blocks changed;
        raises DupstudioError (nothing changed) when the result would be invalid."""
        from dupstudio.gui.undo import BlockEditCommand

        if self.config is None:
            raise DupstudioError("no configuration")
        if self.locked:
            raise DupstudioError("a calibration is running: the configuration is read-only until it ends")
        changes = {}
        for k in sorted(set(int(b) for b in blocks)):
            if not 0 <= k < self.num_blocks:
                continue
            spec = edited_spec(self.config, k, field, value)
            if spec is not None:
                changes[k] = spec
        if not changes:
            return 0
        trial = copy.copy(self.config)
        trial.blocks = [changes.get(i, b) for i, b in enumerate(self.config.blocks)]
        C.validate(trial, self.shape)
        drop = set() if field in KEEPS_CALIBRATION else set(changes)
        if text is None:
            shown = value if not isinstance(value, (list, tuple)) else ", ".join(f"{x:g}" for x in value)
            where = f"block {next(iter(changes))}" if len(changes) == 1 else f"{len(changes)} blocks"
            text = f"Set {FIELD_LABELS.get(field, field)} = {shown} on {where}"
        self.undo_stack.push(BlockEditCommand(self, text, changes, drop))
        return len(changes)

    def replace_config(self, cfg: C.Config, text: str) -> None:
        from dupstudio.gui.undo import ReplaceConfigCommand

        self.undo_stack.push(ReplaceConfigCommand(self, cfg, text))

    # called by the commands
    def _blocks_touched(self, blocks: list) -> None:
        self.revision += 1
        for k in blocks:
            self.block_rev[k] = self.revision
        self.blocks_changed.emit(list(blocks))

    # ------------------------------------------------------------------ weight-error cache
    def metrics_for(self, k: int) -> Optional[dict]:
        m = self.metrics.get(k)
        if m is None or k >= len(self.block_rev) or m["revision"] != self.block_rev[k]:
            return None
        return m

    def stale_blocks(self) -> list:
        return [k for k in range(self.num_blocks) if self.metrics_for(k) is None]

    def accept_metrics(self, result: dict) -> None:
        changed = []
        for k, m in result.items():
            if k < len(self.block_rev) and m["revision"] == self.block_rev[k]:
                self.metrics[k] = m
                changed.append(k)
        if changed:
            self.metrics_changed.emit(changed)


FIELD_LABELS = {"replicas": "K", "mode": "mode", "bits": "bits", "group_size": "group size",
                "strategy": "strategy", "init": "replica init", "granularity": "granularity",
                "gains": "α/w", "residual_gain": "β"}
