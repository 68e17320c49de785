"""A calibration's per-block checkpoints: a run's claim on its folder, each finished block written
before the next starts, and read back to resume a stopped run or show a running one.

A folder holds ``run.json`` (the fingerprint of the model, configuration, text and settings the
blocks belong to), ``lock`` (the process writing there) and per block ``block_NNN.json`` (gains,
β, the block's record) with ``block_NNN.safetensors`` (its tensors, when accepted).
:func:`dupstudio.core.calibrate.calibrate` raises :class:`~dupstudio.core.jobs.Cancelled` when
cancelled; :func:`block_record`, :func:`finished_blocks` and :func:`apply_checkpointed` let a
caller show a block's result as soon as it is written and keep the finished blocks of a
cancelled run.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Optional

import mlx.core as mx
import numpy as np

from dupstudio.core.calibration.block import BlockResult
from dupstudio.core.calibration.settings import CalibSettings
from dupstudio.core.config import Config
from dupstudio.core.jobs import DupstudioError
from dupstudio.core.model_io import LoadedModel, model_shape

def run_fingerprint(loaded: LoadedModel, cfg: Config, tokens: np.ndarray, settings: CalibSettings) -> str:
    """What a checkpoint folder's blocks depend on: the model, the configuration (its tensors
    included), the calibration tokens and the settings. A resume is only right when all match."""
    h = hashlib.sha256()
    h.update(json.dumps({"model": str(loaded.source), "shape": model_shape(loaded.config),
                         "settings": settings.key(),
                         "config": {k: v for k, v in cfg.to_dict().items() if k not in ("provenance", "results")}},
                        sort_keys=True, default=str).encode())
    for name in sorted(cfg.tensors):
        a = np.array(cfg.tensors[name])
        h.update(f"{name}{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    h.update(np.ascontiguousarray(tokens, dtype=np.int64).tobytes())
    return h.hexdigest()[:24]


def claim_checkpoint(ck: Path, fingerprint: str) -> Path:
    """Make ``ck`` this run's checkpoint folder and return its lock file.

    Refused, with the reason, when another live process holds the folder (two runs writing one
    output would delete each other's blocks) or when its blocks came from another model,
    configuration, text or settings (resuming them would mix two runs)."""
    import os

    from dupstudio.core.safeio import atomic_write_bytes, pid_alive

    ck.mkdir(parents=True, exist_ok=True)
    lock = ck / "lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            pid = int(lock.read_text().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid and pid != os.getpid() and pid_alive(pid):
            raise DupstudioError(f"{ck}: another calibration (process {pid}) is writing here; wait "
                                 "for it to finish or choose another output") from None
        lock.unlink(missing_ok=True)  # left by a run that was killed
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    run = ck / "run.json"
    try:
        old = json.loads(run.read_text()).get("fingerprint") if run.exists() else None
    except (OSError, json.JSONDecodeError):
        old = None
    has_blocks = any(ck.glob("block_*.json"))
    if has_blocks and old != fingerprint:
        lock.unlink(missing_ok=True)
        raise DupstudioError(f"{ck} holds finished blocks of another run (a different model, "
                             "configuration, calibration text or settings); delete that folder to "
                             "start afresh, or rerun exactly as before to resume")
    if old != fingerprint:
        atomic_write_bytes(run, json.dumps({"fingerprint": fingerprint}).encode())
    return lock


def checkpoint_paths(ck: Path, k: int):
    """(tensors file, record file) of block k in checkpoint folder ``ck``."""
    return ck / f"block_{k:03d}.safetensors", ck / f"block_{k:03d}.json"


def save_checkpoint(ck, k, settings, tensors, gains, beta, rec):
    """Write block k's checkpoint (tensors first, then the record that says they are there)."""
    from dupstudio.core.config import atomic_write_bytes

    import os

    st, js = checkpoint_paths(ck, k)
    if tensors:
        # the process id in the name: a killed run's leftover never collides with a live one's
        tmp = st.with_name(f".{st.stem}.tmp-{os.getpid()}.safetensors")
        mx.save_safetensors(str(tmp), tensors)
        tmp.replace(st)
    atomic_write_bytes(js, json.dumps({"settings": settings.key(), "gains": gains, "beta": beta,
                                       "record": rec, "has_tensors": bool(tensors)}).encode())


def load_checkpoint(ck, k, settings, cfg):
    """Block k's checkpoint ``(tensors, gains, beta, record)`` written with ``settings``, the
    tensors lazy reads of its file; None when there is none (or it is incomplete)."""
    st, js = checkpoint_paths(ck, k)
    if not js.exists():
        return None
    try:
        d = json.loads(js.read_text())
    except json.JSONDecodeError:
        return None
    if d.get("settings") != settings.key():
        return None
    t = dict(mx.load(str(st))) if d.get("has_tensors") and st.exists() else {}
    if d.get("has_tensors") and not t:
        return None
    return t, d["gains"], d["beta"], d["record"]


def restore_block(out, k, done, results) -> None:
    """Put a checkpointed block ``(tensors, gains, beta, record)`` into ``out`` and ``results``."""
    t, gains, beta, rec = done
    out.tensors.update(t)
    out.blocks[k].gains, out.blocks[k].residual_gain, out.blocks[k].calibration = gains, beta, rec
    results.append(BlockResult(k, rec["loss_before"], rec["loss_after"], rec["accepted"],
                               rec["seconds"], rec["steps"], rec["method"]))


def record_block(out, k, res, t, gains, beta, settings, ck, results) -> None:
    """Keep a calibrated block's result: its tensors and gains only if accepted (never worse),
    its record always, and its checkpoint when ``ck`` is a folder."""
    results.append(res)
    rec = asdict(res)
    rec.pop("curve")
    rec["settings"] = settings.key()
    if res.accepted:
        out.tensors.update(t)
        out.blocks[k].gains, out.blocks[k].residual_gain = gains, beta
    out.blocks[k].calibration = rec
    if ck:
        save_checkpoint(ck, k, settings, t if res.accepted else {},
                        out.blocks[k].gains, out.blocks[k].residual_gain, rec)


def block_record(checkpoint_dir: Path, k: int, settings=None) -> Optional[dict]:
    """The calibration record of block ``k`` (loss before/after, accepted, seconds, steps, method)
    once its checkpoint is written; None before (or when written with other ``settings``)."""
    _, js = checkpoint_paths(Path(checkpoint_dir), k)
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
    :func:`~dupstudio.core.calibrate.calibrate` would have (tensors only where the block was accepted). Returns
    ``(config, applied_blocks)``; the tensors may be lazy reads of the checkpoint files."""
    out = cfg.copy()
    out.tensors = dict(cfg.tensors)
    results: list = []
    applied = []
    for k in finished_blocks(checkpoint_dir, blocks, settings):
        done = load_checkpoint(Path(checkpoint_dir), k, settings, cfg)
        if done is None:
            continue
        restore_block(out, k, done, results)
        applied.append(k)
    return out, applied
