"""The block-by-block calibration loop: one loop, whatever holds the model and its activations.

Block k is calibrated (:func:`dupstudio.core.calibration.block.calibrate_block`) on

* targets  Y = float block k applied to the float model's inputs of block k;
* inputs   X = the *quantized* model's output of blocks 0..k-1 (``incremental=True``) or the float
  inputs (``incremental=False``).

Only the activations at one block boundary are alive at a time. Two things vary with how much
memory a run may use, and :func:`calibrate_blocks` takes both as arguments:

* a **weight source** gives block k's float decoder layer and its float linear weights, and may
  release them when the block is done: :class:`ModelWeights` (the loaded model's own layers) or
  :class:`dupstudio.core.streaming.FileWeights` (read from the model's safetensors per block);
* an **activation store** holds the block-boundary activations: :class:`ActivationStore` (MLX
  arrays in memory) or :class:`dupstudio.core.streaming.SpilledActivations` (memory-mapped files).

Whichever pair is used, the blocks, batches, random generator and order of operations are the
same, so the tensors and losses are identical.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from dupstudio.core import adapters
from dupstudio.core.calibration.block import (block_forward, calibrate_block, chunks,
                                              configured_block, embed_inputs)
from dupstudio.core.calibration.checkpoints import (checkpoint_paths, load_checkpoint,
                                                    record_block, restore_block)
from dupstudio.core.calibration.settings import CalibSettings
from dupstudio.core.config import Config
from dupstudio.core.jobs import CancelToken, DupstudioError, ProgressFn, ensure
from dupstudio.core.model_io import LoadedModel, block_linears, model_shape
from dupstudio.core.replicate import embedding_modules


# --------------------------------------------------------------------------- weight sources
class ModelWeights:
    """Block k's float layer and weights from the loaded model itself (all in memory); nothing
    is released."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self._linears: Optional[list] = None

    def block(self, k: int) -> tuple:
        """(float decoder layer k, matrix name -> its float (out, in) weight)."""
        if self._linears is None:
            self._linears = block_linears(self.loaded.model)
        return self.loaded.model.model.layers[k], self._linears[k]

    def release(self, k: int) -> None:
        """Block k is done (the loop never asks for it again)."""

    def release_embedding(self) -> None:
        """The embed step is done."""


# --------------------------------------------------------------------------- activation stores
class ActivationStore:
    """Block-boundary activations (seqs, T, H) as float32 MLX arrays in memory.

    A *handle* is what :meth:`keep` and :meth:`map` return; the loop only passes handles back to
    the store. :meth:`drop` says a handle is no longer needed, :meth:`close` that none is."""

    def keep(self, arr):
        """Hold ``arr`` (an MLX array); its handle."""
        mx.eval(arr)
        return arr

    def map(self, f: Callable, h, batch: int):
        """The handle of ``f`` applied to ``h`` a batch of ``batch`` sequences at a time."""
        out = mx.concatenate([f(h[sl]) for sl in chunks(h.shape[0], batch)])
        mx.eval(out)
        return out

    def whole(self, h) -> mx.array:
        """All of ``h`` as one MLX array (to calibrate a block on)."""
        return h

    def drop(self, h) -> None:
        """``h`` is not used again."""

    def close(self) -> None:
        """Nothing is used again."""


# --------------------------------------------------------------------------- the loop
def check_run(loaded: LoadedModel, cfg: Config, tokens: np.ndarray, blocks: Optional[list]) -> set:
    """Refuse what cannot run (a configuration of another model, tokens that are not windows,
    blocks outside the model); the set of blocks to calibrate."""
    from dupstudio.core.config import validate

    validate(cfg, model_shape(loaded.config))
    if tokens.ndim != 2 or tokens.shape[1] < 16:
        raise DupstudioError("calibration tokens must be (sequences, length ≥ 16)")
    n_blocks = len(loaded.model.model.layers)
    todo = set(range(n_blocks) if blocks is None else blocks)
    if not todo:
        raise DupstudioError("no blocks to calibrate")
    if max(todo) >= n_blocks or min(todo) < 0:
        raise DupstudioError(f"block {max(todo)} is beyond the model's {n_blocks} blocks")
    return todo


def calibrate_blocks(loaded: LoadedModel, cfg: Config, tokens: np.ndarray, settings: CalibSettings,
                     weights, acts, *, progress: Optional[ProgressFn] = None,
                     cancel: Optional[CancelToken] = None,
                     on_loss: Optional[Callable[[int, int, float], None]] = None,
                     checkpoint_dir: Optional[Path] = None, blocks: Optional[list] = None,
                     lazy_results: bool = False, label: str = "") -> Config:
    """A copy of ``cfg`` with blocks ``blocks`` (default: all) calibrated on ``tokens`` (seqs,
    seq_len), block after block, and its provenance (``provenance["calibration"]``).

    ``weights``: the weight source (:class:`ModelWeights` or one like it); ``acts``: the
    activation store (:class:`ActivationStore` or one like it; the caller closes it).
    ``checkpoint_dir``: each finished block is written there and a block already there is
    resumed; with ``lazy_results`` the finished blocks' tensors are then held as lazy reads of
    their checkpoint files, so the result does not grow in memory block after block. ``label``
    (e.g. "streamed") is added to the progress messages."""
    progress, cancel = ensure(progress, cancel)
    tokens = np.asarray(tokens)
    todo = check_run(loaded, cfg, tokens, blocks)
    t_start = time.perf_counter()
    out = cfg.copy()
    out.tensors = dict(cfg.tensors)
    args = loaded.model.args
    n_blocks = len(loaded.model.model.layers)
    last = max(todo)
    bs = settings.batch
    arch = adapters.of_model(loaded.model)
    results: list = []
    ck = Path(checkpoint_dir) if checkpoint_dir else None
    if ck:
        ck.mkdir(parents=True, exist_ok=True)
    on_disk: dict = {}  # block -> names of its tensors held as lazy reads of its checkpoint

    def to_disk(k):
        if k in on_disk:
            lz = mx.load(str(checkpoint_paths(ck, k)[0]))
            out.tensors.update({key: lz[key] for key in on_disk[k]})

    # the embed step: block 0's float and quantized inputs
    toks = mx.array(tokens)
    x_fp = embed_inputs(loaded, loaded.model.model.embed_tokens, toks)
    emb_q, _ = embedding_modules(loaded, cfg, "simulate", mx.float32)
    x_q = embed_inputs(loaded, emb_q, toks)
    mx.eval(x_fp, x_q)
    del emb_q
    weights.release_embedding()
    x_fp = acts.keep(x_fp)
    x_q = acts.keep(x_q) if settings.incremental else x_fp

    for k in range(n_blocks):
        cancel.check()
        t0 = time.perf_counter()
        mask = arch.causal_mask(args, k, tokens.shape[1])  # block k's (a sliding window's)
        layer, float_w = weights.block(k)
        # targets: the float block on the float inputs, batch by batch
        y = acts.map(partial(block_forward, layer, mask=mask), x_fp, bs)
        if x_q is not x_fp:
            acts.drop(x_fp)  # (not incremental: x_q is x_fp, dropped when advancing)
        x_fp = None
        if k in todo:
            done = load_checkpoint(ck, k, settings, cfg) if ck else None
            if done is not None:
                restore_block(out, k, done, results)  # (tensors: lazy reads of the checkpoint file)
                if lazy_results and done[0]:
                    on_disk[k] = list(done[0])
                progress((k + 1) / n_blocks, f"block {k}: resumed from checkpoint")
            else:
                xq_m, y_m = acts.whole(x_q), acts.whole(y)
                # a generator of each block's own (seed, block): a block's batches and held-out
                # sequences do not depend on which blocks ran before it, so a resumed run (or one
                # over some blocks only) draws exactly what the whole run drew
                rng = np.random.default_rng([settings.seed, k])
                res, t, gains, beta = calibrate_block(loaded, out, k, float_w, layer, xq_m, y_m, mask,
                                                      settings, rng, progress, cancel, on_loss, n_blocks)
                del xq_m, y_m
                record_block(out, k, res, t, gains, beta, settings, ck, results)
                if ck and lazy_results and res.accepted:
                    on_disk[k] = list(t)
                    to_disk(k)
                del t
            secs = f"{time.perf_counter() - t0:.1f}s" + (f", {label}" if label else "")
            progress((k + 1) / n_blocks, f"block {k}: loss {results[-1].loss_before:.4g} → "
                     f"{results[-1].loss_after:.4g} ({secs})")
        if k != last:
            # block k + 1's inputs: the float ones are block k's targets; the quantized ones
            # block k of the configuration (as calibrated) applied to block k's
            if settings.incremental:
                new_q = acts.map(partial(configured_block(loaded, out, k), mask=mask), x_q, bs)
                acts.drop(x_q)
                x_fp, x_q = y, new_q
            else:
                acts.drop(x_q)
                x_fp = x_q = y
            to_disk(k)  # advancing read (and so would keep) block k's tensors
        del layer, float_w, y
        weights.release(k)
        if k == last:
            break  # nothing after the last requested block changes
    progress(1.0, f"calibrated {len(results)} block(s)" + (f" ({label})" if label else ""))
    out.provenance = dict(out.provenance)
    out.provenance["calibration"] = calibration_record(settings, t_start, tokens)
    out.provenance["calibration"]["blocks"] = [asdict(r) | {"curve": r.curve[-1:]} for r in results]
    return out


def calibration_record(settings: CalibSettings, t_start: float, tokens: np.ndarray) -> dict:
    """A run's provenance: its settings, seconds since ``t_start``, tokens and text windows."""
    from dupstudio.core.evaluate import provenance as _prov

    rec = {"settings": asdict(settings), "seconds": time.perf_counter() - t_start,
           "tokens": int(tokens.size), **_prov("", tokens.shape[0], tokens.shape[1], settings.seed)}
    rec.pop("text_sha256", None)
    return rec
