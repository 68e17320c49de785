"""Calibrate replica parameters on text without retraining: the entry point.

:func:`calibrate` runs the stages its :class:`CalibSettings` ask for on a configuration and
returns a new one with the tuned parameters and their provenance:

1. the block-wise pass (unless ``method="e2e"``): block after block, each block's replicas tuned
   to match the float block's output on the quantized model's inputs, kept only if its loss went
   down (the never-worse guard); in memory, or streamed one block's weights at a time
   (``stream=True``: :func:`dupstudio.core.streaming.calibrate_streamed`);
2. the end-to-end stage (``e2e_steps`` > 0, or ``method="e2e"``): all blocks together against the
   float model's next-token distribution.

The work lives in :mod:`dupstudio.core.calibration`:

* :mod:`~dupstudio.core.calibration.settings`     the settings, presets and method names;
* :mod:`~dupstudio.core.calibration.block`        one block's problem and its methods
  (stats, grid, adam, ap);
* :mod:`~dupstudio.core.calibration.loop`         the one block-by-block loop, over a weight
  source and an activation store;
* :mod:`~dupstudio.core.calibration.checkpoints`  per-block checkpoints, resume, the run's lock;
* :mod:`~dupstudio.core.calibration.gptq`, :mod:`~dupstudio.core.calibration.e2e`  GPTQ codes and
  the end-to-end stage.

This module re-exports the names the command line, the app, the scripts and the other core
modules use, so ``from dupstudio.core.calibrate import calibrate, settings_from`` keeps working.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from dupstudio.core.calibration.block import (LSQ_RIDGE, BlockResult, block_forward, embed_inputs,
                                              weighted_lsq)
from dupstudio.core.calibration.checkpoints import claim_checkpoint, run_fingerprint
from dupstudio.core.calibration.loop import (ActivationStore, ModelWeights, calibrate_blocks,
                                             calibration_record)
from dupstudio.core.calibration.settings import (CODE_METHODS, METHOD_HELP, METHODS, PRESET_HELP,
                                                 PRESETS, CalibSettings, settings_from)
from dupstudio.core.config import Config
from dupstudio.core.jobs import CancelToken, DupstudioError, ProgressFn, ensure
from dupstudio.core.model_io import LoadedModel, model_shape

__all__ = ["calibrate", "CalibSettings", "settings_from", "PRESETS", "PRESET_HELP", "METHODS",
           "METHOD_HELP", "CODE_METHODS", "run_fingerprint", "claim_checkpoint", "block_forward",
           "embed_inputs", "weighted_lsq", "LSQ_RIDGE", "BlockResult"]


def calibrate(loaded: LoadedModel, cfg: Config, tokens: np.ndarray, settings: CalibSettings, *,
              progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
              on_loss: Optional[Callable[[int, int, float], None]] = None,
              checkpoint_dir: Optional[Path] = None, blocks: Optional[list] = None,
              stream: bool = False, spill="auto") -> Config:
    """Return a new configuration with tuned replica parameters and its provenance.

    ``tokens`` is (seqs, seq_len) calibration windows. ``on_loss(block, step, loss)`` receives
    the training loss (for a live curve). ``checkpoint_dir`` saves each finished block and
    resumes a stopped run. ``stream``: one block's float weights in memory at a time (read
    lazily from the model's files, released after use; ``spill``: activations memory-mapped),
    same result: :func:`dupstudio.core.streaming.calibrate_streamed`."""
    kw = dict(progress=progress, cancel=cancel, on_loss=on_loss, checkpoint_dir=checkpoint_dir,
              blocks=blocks, stream=stream, spill=spill)
    if not checkpoint_dir:
        return _calibrate(loaded, cfg, tokens, settings, **kw)
    lock = claim_checkpoint(Path(checkpoint_dir), run_fingerprint(loaded, cfg, tokens, settings))
    try:
        return _calibrate(loaded, cfg, tokens, settings, **kw)
    finally:
        lock.unlink(missing_ok=True)


def _calibrate(loaded: LoadedModel, cfg: Config, tokens: np.ndarray, settings: CalibSettings, *,
               progress, cancel, on_loss, checkpoint_dir, blocks, stream, spill) -> Config:
    if stream:
        from dupstudio.core.streaming import calibrate_streamed

        if settings.method == "e2e" or settings.e2e_steps:
            # the end-to-end stage backpropagates through the whole model at once
            msg = ("the end-to-end stage needs the whole model in memory and is skipped when "
                   "streaming; run without --stream where it fits")
            if settings.method == "e2e":
                raise DupstudioError(msg)
            (progress or (lambda f, m: None))(None, msg)
        out = calibrate_streamed(loaded, cfg, tokens[:settings.seqs], settings, progress=progress, cancel=cancel,
                                 on_loss=on_loss, checkpoint_dir=checkpoint_dir, blocks=blocks,
                                 spill=spill)
        if settings.e2e_steps:
            out.provenance["calibration"]["end_to_end"] = {"skipped": msg}
        return out
    progress, cancel = ensure(progress, cancel)
    if settings.method == "e2e":
        return _end_to_end(loaded, cfg, tokens, settings, progress, cancel, on_loss, steps_fallback=True)
    # the block-wise pass on the first ``seqs`` windows (the end-to-end stage may use more)
    out = calibrate_blocks(loaded, cfg, np.asarray(tokens)[:settings.seqs], settings, ModelWeights(loaded),
                           ActivationStore(), progress=progress, cancel=cancel, on_loss=on_loss,
                           checkpoint_dir=checkpoint_dir, blocks=blocks)
    if settings.e2e_steps:
        out = _end_to_end(loaded, out, tokens, settings, progress, cancel, on_loss)
    return out


def _end_to_end(loaded, cfg, tokens, settings, progress, cancel, on_loss, steps_fallback=False):
    """Run the end-to-end KL stage on ``cfg`` and record it in the provenance."""
    from dupstudio.core.calibration.e2e import tune_end_to_end
    from dupstudio.core.config import validate

    t_start = time.perf_counter()
    validate(cfg, model_shape(loaded.config))
    steps = settings.e2e_steps or (settings.steps if steps_fallback else 0)
    if settings.e2e_seqs:
        tokens = tokens[:settings.e2e_seqs]
    new, rec = tune_end_to_end(loaded, cfg, tokens, steps=steps, lr=settings.e2e_lr,
                               batch=settings.batch, holdout=max(settings.holdout, 0.125),
                               residual_gain=settings.residual_gain, seed=settings.seed,
                               progress=progress, cancel=cancel, on_loss=on_loss)
    new.provenance = dict(new.provenance)
    cal = dict(new.provenance.get("calibration") or calibration_record(settings, t_start, tokens))
    cal["end_to_end"] = asdict(rec) | {"curve": rec.curve[-1:], "tokens": int(tokens.size)}
    cal["seconds"] = cal.get("seconds", 0.0) + rec.seconds if "blocks" in cal else rec.seconds
    new.provenance["calibration"] = cal
    progress(1.0, f"end-to-end: held-out KL {rec.kl_before:.4g} → {rec.kl_after:.4g}"
             + ("" if rec.accepted else " (not better: configuration kept)")
             + (" — stopped early" if rec.stopped == "cancelled" else ""))
    return new

