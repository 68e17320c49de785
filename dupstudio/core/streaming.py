"""Streamed (block-by-block) evaluation and a peak-memory estimator (issue 11).

The in-memory path holds the whole float base model *and* the built configuration. The
streamed path loads the model lazily (``open_model(path, lazy=True)``) and runs all windows
through one block at a time: embedding -> block 0 for every window -> block 1 ... Only one
block's float weights and its built replicas live at once (released after use), plus the
activations at one block boundary (input and output buffers; memory-mapped files under
``dupstudio_home()/tmp`` when they would not fit in RAM). The result equals
``evaluate(build(loaded, cfg, mode), windows, reference=loaded.model)`` to float tolerance
(same modules, same batches, same operation order).
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from dupstudio.core.jobs import CancelToken, DupstudioError, ProgressFn, ensure


# --------------------------------------------------------------------------- memory
def available_memory() -> int:
    """Bytes of RAM available to a new allocation (Linux: MemAvailable; elsewhere: physical
    memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _dtype_bytes(dtype_bytes: Optional[int]) -> int:
    if dtype_bytes:
        return int(dtype_bytes)
    from dupstudio.core.model_io import compute_dtype

    return compute_dtype().size


def estimate_peak_memory(config_json: dict, cfg=None, windows: int = 16, ctx: int = 512,
                         calib_seqs: int = 0, seq_len: int = 0, *, batch: int = 4,
                         reference: bool = True, dtype_bytes: Optional[int] = None) -> dict:
    """Estimated peak bytes of evaluation (and, when ``calib_seqs`` > 0, calibration) held in
    memory versus streamed block by block, from the model's ``config.json`` alone.

    Returns ``in_memory_bytes`` and ``streamed_bytes`` (the larger of evaluation and
    calibration for each path) and the parts they are made of. An estimate: it counts weights,
    activations and the largest transient arrays, not allocator slack or the Python runtime
    (add ~0.3 GB)."""
    from dupstudio.core.model_io import model_shape

    s = model_shape(config_json)
    b = _dtype_bytes(dtype_bytes)
    H, I, V, nb = s["hidden_size"], s["intermediate_size"], s["vocab_size"], s["num_blocks"]
    qd, kvd = s["num_heads"] * s["head_dim"], s["num_kv_heads"] * s["head_dim"]
    lin = 2 * H * qd + 2 * H * kvd + 3 * H * I
    emb = V * H * (1 if s["tied_embeddings"] else 2)
    ks = [1] * nb if cfg is None else [blk.replicas for blk in cfg.blocks]
    ref = reference and cfg is not None
    T = ctx - 1
    base = b * (nb * lin + emb)
    built = 0 if cfg is None else b * (sum(ks) * lin + emb)
    # building one block: fp32 copies of the float weights, uint8 codes, dequantized temporaries
    build_tmp = lin * (4 + 1 + 4)
    # one batch through the model (and the reference): logits, log-probs, exp; hidden states;
    # attention scores
    def batch_tmp(nw):
        per = nw * T * (3 * V * 4 + 8 * H * b + 3 * I * b) + nw * s["num_heads"] * T * T * b * 2
        return per * (2 if ref else 1)

    eval_in_memory = base + built + (build_tmp if cfg is not None else 0) + batch_tmp(batch)
    streams = 2 if ref else 1
    acts = 2 * streams * windows * T * H * b  # input and output buffers at one block boundary
    one_block = max((1 + k) * lin * b for k in ks) + (build_tmp if cfg is not None else 0)
    eval_streamed = b * emb * (2 if cfg is not None else 1) + one_block + acts + batch_tmp(batch)
    out = {
        "eval_in_memory_bytes": int(eval_in_memory),
        "eval_streamed_bytes": int(eval_streamed),
        "activation_bytes_streamed": int(acts),
        "base_weight_bytes": int(base),
        "built_weight_bytes": int(built),
    }
    in_mem, streamed = eval_in_memory, eval_streamed
    if calib_seqs and seq_len:
        # calibration keeps block inputs, the reference outputs and the current outputs of the
        # calibration sequences, plus one block's trainable problem (weights, gradients, Adam)
        cacts = 3 * calib_seqs * seq_len * H * 4
        problem = max(ks) * lin * 4 * 4 + build_tmp
        cal_mem = base + cacts + problem
        cal_str = b * emb + lin * b + cacts + problem
        out.update(calib_in_memory_bytes=int(cal_mem), calib_streamed_bytes=int(cal_str))
        in_mem, streamed = max(in_mem, cal_mem), max(streamed, cal_str)
    out["in_memory_bytes"] = int(in_mem)
    out["streamed_bytes"] = int(streamed)
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


# --------------------------------------------------------------------------- activations
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


class _Buffers:
    """Activation buffers (n, T, H) in RAM or memory-mapped files under dupstudio_home()/tmp."""

    def __init__(self, shape, np_dtype, count: int, spill: bool):
        self.files = []
        self.arrays = []
        self.spilled = spill
        if spill:
            from dupstudio.core.model_io import dupstudio_home

            d = dupstudio_home() / "tmp"
            d.mkdir(parents=True, exist_ok=True)
            for _ in range(count):
                fd, name = tempfile.mkstemp(prefix="stream-acts-", suffix=".npy", dir=d)
                os.close(fd)
                self.files.append(Path(name))
                self.arrays.append(np.lib.format.open_memmap(name, mode="w+", dtype=np_dtype,
                                                             shape=shape))
        else:
            self.arrays = [np.empty(shape, dtype=np_dtype) for _ in range(count)]

    def close(self):
        self.arrays = []
        for f in self.files:
            try:
                f.unlink()
            except OSError:
                pass


class _Released:
    """Stands in for a decoder layer whose weights were dropped after use."""

    def __getattr__(self, name):
        raise DupstudioError("this block's weights were released by the streamed evaluation")


# --------------------------------------------------------------------------- evaluation
def evaluate_streamed(source, cfg=None, windows: np.ndarray = None, *, mode: str = "simulate",
                      reference: bool = False, batch_size: int = 4, spill="auto",
                      release: Optional[bool] = None, progress: Optional[ProgressFn] = None,
                      cancel: Optional[CancelToken] = None, seed: int = 0, dtype=None):
    """Perplexity (and with ``reference``: KL from, and top-1 agreement with, the
    full-precision model) of configuration ``cfg`` (None: the base model) on ``windows``,
    computed block by block.

    ``source``: a model path/name (opened lazily here) or an already opened
    :class:`LoadedModel` (ideally opened with ``lazy=True``). ``release``: drop each block's
    float weights from the loaded model after use (default: only when this function opened the
    model). ``spill``: "auto" (memory-map the activations when they would take more than half
    the available RAM), True or False."""
    import mlx.core as mx
    from mlx_lm.models.base import create_attention_mask

    from dupstudio.core.evaluate import EvalResult, bootstrap_ppl, score_logits
    from dupstudio.core.model_io import (ATTN_MATRICES, MATRIX_NAMES, LoadedModel, model_shape,
                                         open_model)
    from dupstudio.core.replicate import (MODES, ReplicatedBlock, block_tensors,
                                          embedding_modules, make_replica_block)

    progress, cancel = ensure(progress, cancel)
    if mode not in MODES:
        raise DupstudioError(f"mode must be one of {MODES}, got {mode!r}")
    t0 = time.perf_counter()
    own = not isinstance(source, LoadedModel)
    loaded = open_model(source, lazy=True, dtype=dtype) if own else source
    release = own if release is None else release
    if cfg is not None:
        from dupstudio.core.config import validate

        validate(cfg, model_shape(loaded.config))
    windows = np.asarray(windows)
    n, ctx = windows.shape
    T = ctx - 1
    args = loaded.model.args
    dtype = loaded.dtype or mx.float32
    H = args.hidden_size
    tied = bool(loaded.config.get("tie_word_embeddings", True))
    base = loaded.model.model
    want_ref = bool(reference) and cfg is not None
    np_dtype = _NP_DTYPES.get(str(dtype).split(".")[-1], np.float32)  # bfloat16 kept as float32
    streams = 2 if want_ref else 1
    act_bytes = 2 * streams * n * T * H * np.dtype(np_dtype).itemsize
    if spill == "auto":
        spill = act_bytes > available_memory() // 2
    bufs = _Buffers((n, T, H), np_dtype, 2 * streams, bool(spill))
    try:
        cur, nxt = bufs.arrays[0], bufs.arrays[1]
        rcur, rnxt = (bufs.arrays[2], bufs.arrays[3]) if want_ref else (None, None)
        if cfg is not None:
            emb, head = embedding_modules(loaded, cfg, mode, dtype)
        else:
            emb, head = base.embed_tokens, (None if tied else loaded.model.lm_head)
        batches = [(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
        mask = None
        for s, e in batches:
            cancel.check()
            x = mx.array(windows[s:e, :-1])
            h = emb(x)
            if mask is None:
                mask = create_attention_mask(h, None)
            outs = [h] + ([base.embed_tokens(x)] if want_ref else [])
            mx.eval(outs)
            cur[s:e] = np.array(outs[0].astype(mx.float32) if np_dtype is np.float32 else outs[0])
            if want_ref:
                rcur[s:e] = np.array(outs[1].astype(mx.float32) if np_dtype is np.float32 else outs[1])
        nblocks = len(base.layers)
        steps = nblocks + 1
        for k in range(nblocks):
            cancel.check()
            layer = base.layers[k]
            if cfg is not None:
                fw = {m: getattr(layer.self_attn if m in ATTN_MATRICES else layer.mlp, m).weight
                      for m in MATRIX_NAMES}
                bt = block_tensors(loaded, cfg, k, float_weights=fw)
                spec = cfg.blocks[k]
                reps = [make_replica_block(args, bt, i, mode, dtype) for i in range(spec.replicas)]
                blk = ReplicatedBlock(reps, spec.mode, spec.gains, spec.residual_gain)
                mx.eval([r.parameters() for r in reps])
                del bt, fw
            else:
                blk = layer
            for s, e in batches:
                cancel.check()
                h = mx.array(cur[s:e]).astype(dtype)
                out = [blk(h, mask, None) if cfg is None else blk(h, mask)]
                if want_ref:
                    out.append(layer(mx.array(rcur[s:e]).astype(dtype), mask, None))
                mx.eval(out)
                nxt[s:e] = np.array(out[0].astype(mx.float32) if np_dtype is np.float32 else out[0])
                if want_ref:
                    rnxt[s:e] = np.array(out[1].astype(mx.float32) if np_dtype is np.float32 else out[1])
            cur, nxt = nxt, cur
            if want_ref:
                rcur, rnxt = rnxt, rcur
            del blk, layer
            if release:
                base.layers[k] = _Released()
            progress((k + 1) / steps, f"streamed block {k + 1}/{nblocks} over {n} windows")
        # final norm + head, scored exactly as evaluate() does
        norm = base.norm
        if cfg is not None:
            import mlx.nn as nn

            norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
            norm.weight = base.norm.weight.astype(dtype)

        def logits_of(hid, n_mod, e_mod, h_mod):
            hid = n_mod(hid)
            return e_mod.as_linear(hid) if h_mod is None else h_mod(hid)

        sums = np.zeros(n)
        kls, agree, count = 0.0, 0, 0
        for s, e in batches:
            cancel.check()
            targets = mx.array(windows[s:e, 1:])
            logits = logits_of(mx.array(cur[s:e]).astype(dtype), norm, emb, head)
            rl = None
            if want_ref:
                rl = logits_of(mx.array(rcur[s:e]).astype(dtype), base.norm, base.embed_tokens,
                               None if tied else loaded.model.lm_head)
            sums[s:e], kl_sum, ag = score_logits(logits, targets, rl)
            kls += kl_sum
            agree += ag
            count += targets.size
        progress(1.0, f"evaluated {n}/{n} windows (streamed)")
    finally:
        bufs.close()
    toks = np.full(n, T)
    mean = float(sums.sum() / toks.sum())
    return EvalResult(
        ppl=float(np.exp(mean)), nll=mean, tokens=int(toks.sum()), windows=n, ctx=ctx,
        ppl_ci95=bootstrap_ppl(sums, toks, seed=seed), window_nll=(sums / toks).tolist(),
        kl=(kls / count) if want_ref else None,
        top1_agreement=(agree / count) if want_ref else None,
        seconds=time.perf_counter() - t0,
    )
