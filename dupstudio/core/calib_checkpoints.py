"""Reading a calibration's per-block checkpoints while it runs or after it stopped.

:func:`dupstudio.core.calibrate.calibrate` with ``checkpoint_dir`` writes each finished block
(its tensors when accepted, its gains, β and record) before moving on, and raises
:class:`~dupstudio.core.jobs.Cancelled` when cancelled. These helpers let a caller show a block's
result as soon as it is written and keep the finished blocks of a cancelled run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from dupstudio.core import calibrate as CB


def block_record(checkpoint_dir: Path, k: int, settings=None) -> Optional[dict]:
    """The calibration record of block ``k`` (loss before/after, accepted, seconds, steps, method)
    once its checkpoint is written; None before (or when written with other ``settings``)."""
    _, js = CB._ck_paths(Path(checkpoint_dir), k)
    try:
        d = json.loads(js.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if settings is not None and d.get("settings") != settings.key():
        return None
    rec = d.get("record")
    return dict(rec) if isinstance(rec, dict) else None


def finished_blocks(checkpoint_dir: Path, blocks: Iterable[int], settings) -> list:
    """The blocks of ``blocks`` whose checkpoint (for ``settings``) is written, in order."""
    return [k for k in sorted(set(int(b) for b in blocks))
            if block_record(checkpoint_dir, k, settings) is not None]


def apply_checkpointed(cfg, checkpoint_dir: Path, settings, blocks: Iterable[int]):
    """A copy of ``cfg`` with every block of ``blocks`` that has a checkpoint put in as
    :func:`calibrate` would have (tensors only where the block was accepted). Returns
    ``(config, applied_blocks)``; the tensors may be lazy reads of the checkpoint files."""
    out = cfg.copy()
    out.tensors = dict(cfg.tensors)
    results: list = []
    applied = []
    for k in finished_blocks(checkpoint_dir, blocks, settings):
        done = CB._load_checkpoint(Path(checkpoint_dir), k, settings, cfg)
        if done is None:
            continue
        CB._restore_block(out, k, done, results)
        applied.append(k)
    return out, applied
