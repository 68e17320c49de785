"""Streamed (block-by-block) evaluation and a peak-memory estimator.

The in-memory path holds the whole float base model *and* the built configuration. The
streamed path loads the model lazily (``open_model(path, lazy=True)``) and runs all windows
through one block at a time: embedding -> block 0 for every window -> block 1 ... Only one
block's float weights and its built replicas live at once (released after use), plus the
activations at one block boundary (input and output buffers; memory-mapped files under
``dupstudio_home()/tmp`` when they would not fit in RAM). The result equals
``evaluate(build(loaded, cfg, mode), windows, reference=loaded.model)`` to float tolerance
(same modules, same batches, same operation order).

Streamed calibration (:func:`calibrate_streamed`) runs the one calibration loop
(:func:`dupstudio.core.calibration.loop.calibrate_blocks`) over this module's weight source
(:class:`StreamedWeights`: block k's float weights read from the files per block) and, when the
activations would not fit, its activation store (:class:`SpilledActivations`: memory-mapped
files): same result as in memory.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from dupstudio.core.units import human_bytes
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
    # streamed, one block at a time: its float weights (released once built unless the
    # reference needs them), its built replicas and the codes / per-matrix temporaries of
    # building them
    mat = max(o * i for o, i in _block_linear_shapes(s).values())
    build_tmp_s = lin * 4 + mat * (4 + 1 + 4)
    one_block = max((1 + k) * lin * b for k in ks) + (build_tmp_s if cfg is not None else 0)
    blk_tmp = batch * T * (8 * H + 3 * I) * b * (2 if ref else 1)
    # the embedding and head are never held whole: the embed step gathers the windows' rows a
    # vocabulary chunk at a time; the head reads (and quantizes) one vocabulary chunk at a time
    # (stored at most 4 bytes per weight; quantized: float32 copy, codes, dequantized) and
    # scores a chunk of rows: its logits, their vocabulary parts, log-probabilities (and the
    # reference's, exp, product)
    rr, vr = _head_chunks(min(batch, windows) * T, V, H)
    r_max, v_max = max(c1 - c0 for c0, c1 in rr), max(c1 - c0 for c0, c1 in vr)
    q = cfg is not None and cfg.embedding.bits is not None
    vchunk = v_max * H * (4 + b + (4 + 1 + 4 if q else 0))
    embed_step = 2 * min(V, windows * T) * H * b + vchunk
    head_step = vchunk + r_max * v_max * 4 + r_max * V * 4 * (7 if ref else 3)
    eval_streamed = acts + max(embed_step, head_step, one_block + blk_tmp)
    out = {
        "eval_in_memory_bytes": int(eval_in_memory),
        "eval_streamed_bytes": int(eval_streamed),
        "activation_bytes_streamed": int(acts),
        "base_weight_bytes": int(base),
        "built_weight_bytes": int(built),
    }
    in_mem, streamed = eval_in_memory, eval_streamed
    if calib_seqs and seq_len:
        c = estimate_calibration_memory(config_json, cfg, calib_seqs, seq_len, batch=batch,
                                        dtype_bytes=b)
        cal_mem, cal_str = c["in_memory_bytes"], c["streamed_bytes"]
        out.update(calib_in_memory_bytes=int(cal_mem), calib_streamed_bytes=int(cal_str))
        in_mem, streamed = max(in_mem, cal_mem), max(streamed, cal_str)
    out["in_memory_bytes"] = int(in_mem)
    out["streamed_bytes"] = int(streamed)
    return out


def _block_linear_shapes(s: dict) -> dict:
    from dupstudio.core.adapters import of_shape

    return of_shape(s).dims(s)


def estimate_calibration_memory(config_json: dict, cfg=None, seqs: int = 32, seq_len: int = 256,
                                settings=None, *, batch: Optional[int] = None,
                                dtype_bytes: Optional[int] = None, spill: Optional[bool] = None,
                                checkpoint: bool = False) -> dict:
    """Estimated peak bytes of :func:`calibrate` with the whole float model in memory versus
    streamed (:func:`calibrate_streamed`), from the model's ``config.json`` (and the
    configuration's K, bits and groups; ``cfg`` None: K = 1, 2-bit g64).

    Counted: the float model (streamed: one block for one pass at a time, or the embedding
    during the embed step); the quantized blocks the result holds (packed codes, fp16
    scales/biases per replica; streamed with a ``checkpoint`` folder: read back from there
    lazily, not held); the largest block's calibration problem: uint8 and float32 codes, the
    input statistics XᵀX, Adam state (parameters, gradients, two moments), the replicas'
    dequantized weights with one matrix's gradient, one batch's forward and backward
    activations, and with ``init="closed_form"`` or ``method="stats"`` the closed-form start's
    largest batch of normal equations; the calibration activations (seqs × seq_len × hidden
    × 4 bytes; three copies: float inputs, quantized inputs, targets; streamed with ``spill``:
    two). Not counted: allocator slack and the Python runtime (add ~0.3 GB)."""
    from dupstudio.core.model_io import model_shape

    s = model_shape(config_json)
    b = _dtype_bytes(dtype_bytes)
    H, I, V, nb = s["hidden_size"], s["intermediate_size"], s["vocab_size"], s["num_blocks"]
    shapes = _block_linear_shapes(s)
    lin = sum(o * i for o, i in shapes.values())
    rows = sum(o for o, _ in shapes.values())
    mat = max(o * i for o, i in shapes.values())
    in_max = max(i for _, i in shapes.values())
    emb = V * H * (1 if s["tied_embeddings"] else 2)
    method = getattr(settings, "method", "adam")
    init = getattr(settings, "init", "closed_form")
    bs = min(batch or getattr(settings, "batch", 4), seqs)
    closed_form = init == "closed_form" or method == "stats"
    sigma = 4 * (2 * H * H + shapes["o_proj"][1] ** 2 + I * I)  # XᵀX of the four input groups

    result, work = 0, 0
    for k in range(nb):
        if cfg is None:
            K, bits, g, grans = 1, 2, 64, ["group"]
        else:
            bits, g, _, _ = cfg.block_quant(k)
            K, grans = cfg.blocks[k].replicas, [r.granularity for r in cfg.blocks[k].replica]
        gs = g if isinstance(g, int) and g > 0 else H
        own = [i == 0 or gr == "group" for i, gr in enumerate(grans)]
        result += lin * bits // 8 + sum(4 * lin // gs if o else 4 * rows for o in own)
        codes = lin * (1 + 4) + lin * bits // 8  # uint8, float32 (the problem's), packed
        adam = 4 * 4 * sum(2 * lin // gs if o else 2 * rows for o in own)
        graph = 4 * lin * K + 4 * mat * K
        fwd = 2 * bs * seq_len * (8 * H + 3 * I) * 4 * K + 2 * bs * s["num_heads"] * seq_len ** 2 * 4
        lsq = 6 * 64 * in_max * (in_max // gs) * 4 if closed_form else 0
        work = max(work,
                   codes + sigma + adam + graph + fwd,  # Adam steps
                   codes + sigma + lsq,  # closed-form start
                   b * lin + sigma + fwd)  # statistics: one float pass of the block
    one_act = seqs * seq_len * H * 4
    base = b * (nb * lin + emb)
    in_memory = base + result + work + 3 * one_act
    streamed_acts = (2 if spill else 3) * one_act
    embed_step = b * emb + 2 * one_act
    streamed = (0 if checkpoint else result) + max(embed_step, work + streamed_acts)
    return {"in_memory_bytes": int(in_memory), "streamed_bytes": int(streamed),
            "float_model_bytes": int(base), "float_block_bytes": int(b * lin),
            "embedding_bytes": int(b * emb), "quantized_bytes": int(result),
            "block_work_bytes": int(work), "activation_bytes": int(3 * one_act)}


def estimate_report_memory(config_json: dict, *, dtype_bytes: Optional[int] = None) -> dict:
    """Estimated peak bytes of the quantization report with the whole float model loaded versus
    one block's weights at a time (plus one matrix's float32 copy, codes, dequantized weights
    and error)."""
    from dupstudio.core.model_io import model_shape

    s = model_shape(config_json)
    b = _dtype_bytes(dtype_bytes)
    shapes = _block_linear_shapes(s)
    lin = sum(o * i for o, i in shapes.values())
    emb = s["vocab_size"] * s["hidden_size"] * (1 if s["tied_embeddings"] else 2)
    mat = max(o * i for o, i in shapes.values())
    tmp = mat * (4 * 4 + 1)
    return {"in_memory_bytes": int(b * (s["num_blocks"] * lin + emb) + tmp),
            "streamed_bytes": int(b * lin + tmp), "float_block_bytes": int(b * lin)}


def pick_stream(in_memory_bytes: int, available: Optional[int] = None,
                override: Optional[bool] = None, resident: int = 0) -> bool:
    """Stream when ``override`` says so, else when the in-memory path would not fit: its
    estimate exceeds the available memory plus what is already ``resident`` (a model the app
    holds)."""
    if override is not None:
        return bool(override)
    avail = available_memory() if available is None else int(available)
    return int(in_memory_bytes) > avail + int(resident)


def memory_line(in_memory_bytes: int, streamed_bytes: int, available: int, stream: bool) -> str:
    """The one line the CLI prints before a run."""
    return (f"memory estimate: in memory {human_bytes(in_memory_bytes)}, streamed "
            f"{human_bytes(streamed_bytes)}; available {human_bytes(available)} -> "
            f"{'streamed' if stream else 'in memory'}")


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


# rows of the embedding / head read from the files, cast (and quantized) at a time
VOCAB_CHUNK = 4096
# bytes of logits scored at a time: rows × vocabulary × 4 (at least one row)
LOGIT_CHUNK_BYTES = 32 << 20
# multiply-adds of one chunk of the head's matmul at least: BLAS libraries switch to other
# kernels, with another summation order, for small products (seen with OpenBLAS 0.3.21: results
# differ from the large product's for M·N·K up to ~0.8M and for N ≤ 2)
_MIN_GEMM = 1 << 22


def _splits(n: int, size: int) -> list:
    """[start, stop) ranges covering n in parts of at most ``size`` and as even as possible."""
    parts = max(1, -(-n // max(1, size)))
    edges = [n * i // parts for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _head_chunks(rows: int, vocab: int, hidden: int) -> tuple:
    """(row ranges, vocabulary ranges) for scoring ``rows`` positions: logits of about
    ``LOGIT_CHUNK_BYTES`` at a time, the head ``VOCAB_CHUNK`` rows at a time, but every chunk's
    matmul large enough for the BLAS kernel the whole one uses (whole when the whole is small),
    so that every logit is the same dot product as in one matmul."""
    if rows * vocab * hidden <= _MIN_GEMM:
        return [(0, rows)], [(0, vocab)]
    r = max(LOGIT_CHUNK_BYTES // (4 * vocab), 2 * (-(-_MIN_GEMM // (vocab * hidden))) + 1)
    rr = _splits(rows, r)
    r_min = min(b - a for a, b in rr)
    nv = max(VOCAB_CHUNK, 128, 2 * (-(-_MIN_GEMM // (r_min * hidden))) + 1)
    return rr, _splits(vocab, nv)


class _VocabWeight:
    """The embedding (or untied lm_head) weight, read from the model's safetensors a range of
    rows at a time (only those bytes; cast as :func:`open_model` casts) and never held whole;
    the model's own array when its files do not hold it."""

    def __init__(self, loaded, name: str, module):
        self.loaded, self.name, self.module = loaded, name, module
        self.vocab = int(module.weight.shape[0])

    def rows(self, start: int, stop: int):
        r = _file_rows(self.loaded, self.name, start, stop)
        return self.module.weight[start:stop] if r is None else r

    def gather(self, ids: np.ndarray):
        """Rows ``ids`` (sorted, unique), read a vocabulary chunk at a time."""
        import mlx.core as mx

        parts = []
        for c0 in range(0, self.vocab, VOCAB_CHUNK):
            c1 = min(self.vocab, c0 + VOCAB_CHUNK)
            sel = ids[(ids >= c0) & (ids < c1)]
            if sel.size:
                part = self.rows(c0, c1)[mx.array(sel - c0)]
                mx.eval(part)
                parts.append(part)
        return mx.concatenate(parts) if len(parts) > 1 else parts[0]


def _chunked_logits(w: _VocabWeight, tied: bool, e, mode: str, dtype, hid, vranges):
    """The logits of (normed) hidden rows ``hid`` (r, H), one vocabulary chunk of the head at a
    time: the chunk's rows read, cast (and quantized) as the whole head's are, so every logit is
    the same dot product as with the whole head."""
    import mlx.core as mx

    from dupstudio.core.replicate import embedding_from, head_from

    parts = []
    for c0, c1 in vranges:
        rows = w.rows(c0, c1)
        if tied:
            part = embedding_from(rows, e, mode, dtype).as_linear(hid)
        else:
            part = head_from(rows, e, mode, dtype)(hid)
        mx.eval(part)
        parts.append(part)
        del rows
    return mx.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]


# --------------------------------------------------------------------------- evaluation
def evaluate_streamed(source, cfg=None, windows: np.ndarray = None, *, mode: str = "simulate",
                      reference: bool = False, batch_size: int = 4, spill="auto",
                      release: Optional[bool] = None, progress: Optional[ProgressFn] = None,
                      cancel: Optional[CancelToken] = None, seed: int = 0, dtype=None):
    """Perplexity (and with ``reference``: KL from, and top-1 agreement with, the
    full-precision model) of configuration ``cfg`` (None: the base model) on ``windows``,
    computed block by block.

    ``source``: a model path/name (opened lazily here) or an already opened
    :class:`LoadedModel` (ideally opened with ``lazy=True``). The embedding and head are never
    held whole: the embed step reads only the embedding rows of the windows' tokens, and the
    head scores ``LOGIT_CHUNK_BYTES`` of logits at a time, reading the head ``VOCAB_CHUNK``
    rows at a time (each in its stored dtype from the model's safetensors, cast and quantized
    as the in-memory path casts and quantizes the whole). ``release``: drop each block's float
    weights (and an evaluated embedding) after use (swapped back for lazy reads of the model's
    files, so the model stays usable; default: only when this function opened the model).
    ``spill``: "auto" (memory-map the activations when they would take more than half the
    available RAM), True or False."""
    import mlx.core as mx

    from dupstudio.core import adapters
    from dupstudio.core.evaluate import EvalResult, bootstrap_ppl, token_scores
    from dupstudio.core.model_io import LoadedModel, model_shape, open_model
    from dupstudio.core.replicate import (MODES, ReplicatedBlock, block_tensors, embedding_from,
                                          final_norm, make_replica_block)

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
    arch = adapters.of_model(loaded.model)
    tied = adapters.is_tied(loaded.model)
    base = loaded.model.model
    want_ref = bool(reference) and cfg is not None
    np_dtype = _NP_DTYPES.get(str(dtype).split(".")[-1], np.float32)  # bfloat16 kept as float32
    streams = 2 if want_ref else 1
    act_bytes = 2 * streams * n * T * H * np.dtype(np_dtype).itemsize
    if spill == "auto":
        spill = act_bytes > available_memory() // 2
    e = cfg.embedding if cfg is not None else None
    emb_w = _VocabWeight(loaded, "model.embed_tokens.weight", base.embed_tokens)
    head_w = emb_w if tied else _VocabWeight(loaded, "lm_head.weight", loaded.model.lm_head)

    def to_np(a):
        return np.array(a.astype(mx.float32) if np_dtype is np.float32 else a)

    bufs = _Buffers((n, T, H), np_dtype, 2 * streams, bool(spill))
    try:
        cur, nxt = bufs.arrays[0], bufs.arrays[1]
        rcur, rnxt = (bufs.arrays[2], bufs.arrays[3]) if want_ref else (None, None)
        # embed step: only the rows of the tokens present (quantization groups lie within a row)
        ids, inv = np.unique(windows[:, :-1], return_inverse=True)
        inv = inv.reshape(n, T)
        rows = emb_w.gather(ids)
        emb = embedding_from(rows, e, mode, dtype)
        batches = [(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
        for s, e_ in batches:
            cancel.check()
            x = mx.array(inv[s:e_])
            h = arch.scale_embeddings(emb(x), args)
            outs = [h] + ([arch.scale_embeddings(rows[x], args)] if want_ref else [])
            mx.eval(outs)
            cur[s:e_] = to_np(outs[0])
            if want_ref:
                rcur[s:e_] = to_np(outs[1])
        del emb, rows, h, outs
        if release:  # (a caller's model may hold an evaluated embedding)
            release_weights(loaded, "model.embed_tokens")
            if not tied:
                release_weights(loaded, "lm_head")
        mx.clear_cache()
        nblocks = len(base.layers)
        steps = nblocks + 1
        for k in range(nblocks):
            cancel.check()
            layer = base.layers[k]
            mask = arch.causal_mask(args, k, T)  # block k's (a sliding window's)
            freed = False
            if cfg is not None:
                fw = _layer_linears(layer)
                bt = block_tensors(loaded, cfg, k, float_weights=fw)
                spec = cfg.blocks[k]
                reps = [make_replica_block(args, bt, i, mode, dtype) for i in range(spec.replicas)]
                blk = ReplicatedBlock(reps, spec.mode, spec.gains, spec.residual_gain)
                mx.eval([r.parameters() for r in reps])
                del bt, fw, reps
                if release and not want_ref:  # the float weights are not used again
                    freed = release_weights(loaded, f"model.layers.{k}")
            else:
                blk = layer
            for s, e_ in batches:
                cancel.check()
                h = mx.array(cur[s:e_]).astype(dtype)
                out = [blk(h, mask, None) if cfg is None else blk(h, mask)]
                if want_ref:
                    out.append(layer(mx.array(rcur[s:e_]).astype(dtype), mask, None))
                mx.eval(out)
                nxt[s:e_] = to_np(out[0])
                if want_ref:
                    rnxt[s:e_] = to_np(out[1])
                del h, out
            cur, nxt = nxt, cur
            if want_ref:
                rcur, rnxt = rnxt, rcur
            del blk, layer
            if release and not freed and not release_weights(loaded, f"model.layers.{k}"):
                base.layers[k] = _Released()
            mx.clear_cache()
            progress((k + 1) / steps, f"streamed block {k + 1}/{nblocks} over {n} windows")
        # final norm + head, scored as evaluate() scores (same per-position values and sums),
        # a chunk of rows at a time so that the logits of a whole batch are never all alive
        norm = base.norm
        if cfg is not None:
            norm = final_norm(loaded, dtype)
        sums = np.zeros(n)
        kls, agree, count = 0.0, 0, 0
        for s, e_ in batches:
            cancel.check()
            b = e_ - s
            hid = cur[s:e_].reshape(b * T, H)
            rhid = rcur[s:e_].reshape(b * T, H) if want_ref else None
            tg = windows[s:e_, 1:].reshape(b * T)
            rranges, vranges = _head_chunks(b * T, head_w.vocab, H)
            nll, kl, ag = [], [], []
            for r0, r1 in rranges:
                lg = _chunked_logits(head_w, tied, e, mode, dtype,
                                     norm(mx.array(hid[r0:r1]).astype(dtype)), vranges)
                rl = None
                if want_ref:
                    rl = _chunked_logits(head_w, tied, None, mode, dtype,
                                         base.norm(mx.array(rhid[r0:r1]).astype(dtype)), vranges)
                got = [a for a in token_scores(lg, mx.array(tg[r0:r1]), rl) if a is not None]
                mx.eval(got)
                nll.append(got[0])
                if want_ref:
                    kl.append(got[1])
                    ag.append(got[2])
                del lg, rl, got
            def cat(xs):
                return mx.concatenate(xs) if len(xs) > 1 else xs[0]

            nll_sum = cat(nll).reshape(b, T).sum(axis=1)
            mx.eval(nll_sum)
            sums[s:e_] = np.array(nll_sum)
            if want_ref:
                kls += float(cat(kl).reshape(b, T).sum())
                agree += int(cat(ag).reshape(b, T).sum())
            count += b * T
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


# --------------------------------------------------------------------------- lazy weights
_ST_DTYPES = {"F32": (np.float32, None), "F16": (np.float16, None), "BF16": (np.uint16, "bfloat16")}


def _weight_index(loaded) -> dict:
    """Tensor name -> (safetensors file, dtype, shape, byte offset of its data) of the model
    folder (headers only; cached)."""
    import json as _json
    import struct

    extra = getattr(loaded, "extra", None)
    idx = extra.get("_weight_index") if isinstance(extra, dict) else None
    if idx is not None:
        return idx
    idx = {}
    path = Path(loaded.path) if getattr(loaded, "path", None) else None
    if path is not None and path.is_dir():
        for f in sorted(path.glob("*.safetensors")):
            try:
                with open(f, "rb") as fh:
                    n = struct.unpack("<Q", fh.read(8))[0]
                    header = _json.loads(fh.read(n))
            except (OSError, ValueError, struct.error):
                continue
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                try:
                    idx[k] = (f, v.get("dtype"), tuple(v.get("shape", ())),
                              8 + n + int(v["data_offsets"][0]))
                except (AttributeError, KeyError, TypeError, ValueError, IndexError):
                    idx[k] = (f, None, (), None)
    if isinstance(extra, dict):
        extra["_weight_index"] = idx
    return idx


def _weight_files(loaded) -> dict:
    """Tensor name -> safetensors file of the model folder (headers only; cached)."""
    extra = getattr(loaded, "extra", None)
    files = extra.get("_weight_files") if isinstance(extra, dict) else None
    if files is None:
        files = {k: v[0] for k, v in _weight_index(loaded).items()}
        if isinstance(extra, dict):
            extra["_weight_files"] = files
    return files


def _file_rows(loaded, name: str, start: int, stop: int):
    """Rows [start, stop) of the 2-D float tensor ``name`` read from the model's safetensors
    (only those bytes), cast as :func:`open_model` casts; None when the files do not hold it
    as a float tensor."""
    import mlx.core as mx

    info = _weight_index(loaded).get(name)
    if info is None or info[1] not in _ST_DTYPES or len(info[2]) != 2 or info[3] is None:
        return None
    f, dt, (nrows, cols), begin = info
    start, stop = max(0, start), min(nrows, stop)
    np_dt, view = _ST_DTYPES[dt]
    size = np.dtype(np_dt).itemsize
    try:
        with open(f, "rb") as fh:
            fh.seek(begin + start * cols * size)
            a = np.fromfile(fh, dtype=np.dtype(np_dt).newbyteorder("<"),
                            count=(stop - start) * cols)
    except OSError:
        return None
    if a.size != (stop - start) * cols:
        return None
    arr = mx.array(a.reshape(stop - start, cols))
    del a
    if view:
        arr = arr.view(getattr(mx, view))
    return arr.astype(getattr(loaded, "dtype", None) or mx.float32)


def lazy_tensors(loaded, names) -> dict:
    """Fresh, unevaluated arrays for the named tensors, read from the model's safetensors on
    evaluation and cast as :func:`open_model` casts them. Names missing from the files are left
    out. Nothing else keeps a reference: once the caller drops them, their memory is free."""
    import mlx.core as mx

    files = _weight_files(loaded)
    by_file: dict = {}
    for n in names:
        if n in files:
            by_file.setdefault(files[n], []).append(n)
    dtype = getattr(loaded, "dtype", None) or mx.float32
    out = {}
    for f, keys in by_file.items():
        arrs = mx.load(str(f))  # lazy: the header only
        for k in keys:
            a = arrs[k]
            out[k] = a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a
        del arrs
    return out


def release_weights(loaded, prefix: str) -> bool:
    """Swap the (evaluated) parameters under ``prefix`` (e.g. ``"model.layers.3"``) for lazy
    arrays read from the model's files: their memory is freed and the model stays usable (the
    weights are read again when next used). False when the files do not hold them all."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    mod = loaded.model
    for part in prefix.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    names = [f"{prefix}.{n}" for n, _ in tree_flatten(mod.parameters())]
    fresh = lazy_tensors(loaded, names)
    if len(fresh) != len(names):
        return False
    mod.update(tree_unflatten([(n[len(prefix) + 1:], a) for n, a in fresh.items()]))
    mx.clear_cache()
    return True


class StreamedBlocks:
    """A sequence of per-block float weights (matrix name -> (out, in) array), each read from
    the model's files when indexed and held only as long as the caller keeps it (quantization
    report one block at a time)."""

    def __init__(self, loaded):
        from dupstudio.core.adapters import of_model

        self.loaded = loaded
        self.n = len(loaded.model.model.layers)
        self._names = {m.name: m.path for m in of_model(loaded.model).matrices}

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for k in range(self.n):
            yield self[k]

    def __getitem__(self, k: int) -> dict:
        if not 0 <= k < self.n:
            raise IndexError(k)
        keys = {m: f"model.layers.{k}.{p}.weight" for m, p in self._names.items()}
        t = lazy_tensors(self.loaded, keys.values())
        if len(t) != len(keys):  # not file-backed: the model's own arrays
            from dupstudio.core.model_io import block_linears

            return block_linears(self.loaded.model)[k]
        return {m: t[key] for m, key in keys.items()}


class _FileWeights:
    """matrix name -> block k's float weight, a *fresh* lazy read from the model's files at every
    access: nothing holds the evaluated weight once the computation that used it is done."""

    def __init__(self, loaded, k: int):
        from dupstudio.core.adapters import of_model

        self.loaded = loaded
        self.names = {m.name: f"model.layers.{k}.{m.path}.weight" for m in of_model(loaded.model).matrices}

    def __getitem__(self, m):
        key = self.names[m]
        return lazy_tensors(self.loaded, [key])[key]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def items(self):
        return ((m, self[m]) for m in self.names)

    def values(self):
        return (self[m] for m in self.names)


def _file_linear_class():
    import mlx.nn as nn

    class FileLinear(nn.Module):
        """``nn.Linear`` whose weight is read from the model's files at each call (the same
        ``x @ W.T``, plus the linear's own bias when it has one)."""

        def __init__(self, weights: _FileWeights, name: str, bias=None):
            super().__init__()
            self._weights, self._name = weights, name
            if bias is not None:
                self.bias = bias

        def __call__(self, x):
            y = x @ self._weights[self._name].T
            return y + self.bias if "bias" in self else y

    return FileLinear


def _file_layer(loaded, k: int):
    """(decoder layer k with file-backed linears, its file-backed weights), or the model's own
    layer and weights when the model's files do not hold them."""
    from dupstudio.core import adapters

    src = loaded.model.model.layers[k]
    fw = _FileWeights(loaded, k)
    if len(lazy_tensors(loaded, fw.names.values())) != len(fw.names):
        return src, _layer_linears(src)
    FileLinear = _file_linear_class()
    blk = adapters.clone(src)  # the architecture's block, its linears read from the files
    for mat in adapters.of_layer(src).matrices:
        bias = adapters.linear_bias(adapters.get_module(src, mat.path))
        adapters.set_module(blk, mat.path, FileLinear(fw, mat.name, bias))
    return blk, fw


# --------------------------------------------------------------------------- calibration
class StreamedWeights:
    """The calibration loop's weight source for a model that is not held whole: block k's float
    layer and weights read from the model's files for each use (never held; the model's own
    when its files do not hold them) and, with ``release``, block k's (and the embedding's)
    parameters swapped back for lazy file reads once done, so a passed-in model stays usable."""

    def __init__(self, loaded, release: bool = True):
        self.loaded, self.release_after = loaded, release

    def block(self, k: int) -> tuple:
        return _file_layer(self.loaded, k)

    def release(self, k: int) -> None:
        if self.release_after:
            release_weights(self.loaded, f"model.layers.{k}")

    def release_embedding(self) -> None:
        if self.release_after:
            release_weights(self.loaded, "model.embed_tokens")


class SpilledActivations:
    """The calibration loop's activation store on disk (the interface of
    :class:`dupstudio.core.calibration.loop.ActivationStore`): each block boundary's activations in
    a .npy memory map under ``dupstudio_home()/tmp`` (float32, as in memory), written and
    read back a batch at a time; the files are deleted when dropped or closed."""

    def __init__(self):
        self.files: list = []

    def _new(self, shape):
        from dupstudio.core.model_io import dupstudio_home

        d = dupstudio_home() / "tmp"
        d.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="calib-acts-", suffix=".npy", dir=d)
        os.close(fd)
        self.files.append(Path(name))
        return np.lib.format.open_memmap(name, mode="w+", dtype=np.float32, shape=tuple(shape))

    def keep(self, arr):
        import mlx.core as mx

        mx.eval(arr)
        mm = self._new(arr.shape)
        mm[:] = np.asarray(arr)
        mm.flush()
        return mm

    def map(self, f, h, batch):
        """(``f`` keeps the shape: a block's output is its input's shape.)"""
        import mlx.core as mx

        from dupstudio.core.calibration.block import chunks

        out = self._new(h.shape)
        for sl in chunks(h.shape[0], batch):
            o = f(mx.array(np.asarray(h[sl])))
            mx.eval(o)
            out[sl] = np.asarray(o)
        out.flush()
        return out

    def whole(self, h):
        import mlx.core as mx

        return mx.array(np.asarray(h))

    def drop(self, h):
        if isinstance(h, np.memmap) and h.filename:
            f = Path(h.filename)
            del h
            try:
                f.unlink()
            except OSError:
                pass
            self.files = [p for p in self.files if p != f]

    def close(self):
        for f in self.files:
            try:
                f.unlink()
            except OSError:
                pass
        self.files = []


def calibrate_streamed(source, cfg, tokens: np.ndarray, settings, *,
                       progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
                       on_loss=None, checkpoint_dir=None, blocks: Optional[list] = None,
                       spill="auto", release: bool = True, dtype=None):
    """:func:`dupstudio.core.calibrate.calibrate`, one decoder block in memory at a time.

    ``source``: a model path/name (opened lazily here) or a :class:`LoadedModel`. The
    embedding is read for the embed step and released; block k's float weights are read from
    the model's safetensors when block k starts and released (swapped back for lazy file-backed
    arrays, so a passed-in model stays usable) when it ends. Activations live at one block
    boundary: the calibration inputs and targets (float32), in memory or, with ``spill``
    (True, or "auto": when three copies would take more than half the available memory), in
    memory-mapped files under ``dupstudio_home()/tmp``, read back for the block being tuned.
    With a ``checkpoint_dir`` a finished block's tensors are held as lazy reads of its
    checkpoint file (as resumed blocks are), so the result does not grow in memory either.

    The same loop as the in-memory path (:func:`dupstudio.core.calibration.loop.calibrate_blocks`,
    here over :class:`StreamedWeights` and memory-mapped activations): the tensors and losses of
    the returned configuration are identical to ``calibrate()``'s."""
    from dupstudio.core.calibration.loop import ActivationStore, calibrate_blocks
    from dupstudio.core.model_io import LoadedModel, open_model

    progress, cancel = ensure(progress, cancel)
    own = not isinstance(source, LoadedModel)
    loaded = open_model(source, lazy=True, dtype=dtype) if own else source
    tokens = np.asarray(tokens)
    if spill == "auto":
        act_bytes = tokens.size * loaded.model.args.hidden_size * 4
        spill = 3 * act_bytes > available_memory() // 2
    acts = SpilledActivations() if spill else ActivationStore()
    try:
        out = calibrate_blocks(loaded, cfg, tokens, settings, StreamedWeights(loaded, release), acts,
                               progress=progress, cancel=cancel, on_loss=on_loss,
                               checkpoint_dir=checkpoint_dir, blocks=blocks, lazy_results=True,
                               label="streamed")
    finally:
        acts.close()
    out.provenance["calibration"]["streamed"] = True
    return out


def _layer_linears(layer) -> dict:
    """The float linear weights of one decoder layer keyed by its architecture's matrix names
    (as block_linears)."""
    from dupstudio.core.adapters import get_module, of_layer

    return {m.name: get_module(layer, m.path).weight for m in of_layer(layer).matrices}
