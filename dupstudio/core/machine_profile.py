"""The "this machine" hardware profile, measured by a short MLX micro-benchmark on the active
backend (about 25 s on 2 CPU cores), cached as JSON under ``dupstudio_home()/machine_profile.json``.

The measured profile has the same figures as ``resources/hardware_profiles.json`` (so
:func:`dupstudio.core.roofline.predict` takes it as is); every figure's source says how it was
measured, and the raw measurements are kept under ``meta["measurements"]``.

What is measured
----------------
* streaming bandwidth: best of a large-array sum (read), an elementwise copy (read + write) and a
  float32 matrix-vector product (read), each over an array larger than the last-level cache;
* float32 matmul throughput (and float16 on a GPU backend);
* ``mx.quantized_matmul`` throughput at 2 and 4 bits, group 64, in a decode shape (one row) and a
  prefill shape (many rows); the profile's quantized peak is the best of the two per bits;
* dispatch cost: time per ``mx.eval`` of a chain of N tiny ops, fitted as
  ``per_eval + N * per_op``;
* on a real ``mlx_lm.models.llama.TransformerBlock`` (random weights, default the SmolLM2-135M
  shapes), quantized with ``mlx.nn.quantize`` at 2 and 4 bits g64, one decode step of one token
  with a KV cache (``context`` positions already cached), timed as *marginal* passes inside one
  ``mx.eval`` so that the per-eval cost, allocation and graph building cancel:

  - ``p_cold``: a pass over block B right after a pass over block A, after the caches were
    flushed (streaming a buffer of twice the last-level cache): B's weights come from DRAM, as for
    every layer of a model that does not fit the cache;
  - ``p_second``: a second pass over block A right after a first pass over A, after a flush: the
    replica case (same codes, own KV cache);
  - ``p_hot``: a second pass over A with everything already cache-resident (no flush);

  Estimators (each time is the best of several trials: other processes only ever add time)::

      r     = (p_second - p_hot) / (p_cold - p_hot)        clipped to [0, 1]
      floor = max(p_cold - max(block bytes / bandwidth, block FLOPs / quantized peak),
                  ops per pass x per-op dispatch cost)

  ``r`` is the share of a cold pass's DRAM weight-read penalty that a second pass over the same
  codes pays again (0: the codes stay in cache; 1: they are read from DRAM again); compute, the
  per-layer floor and the KV traffic are common to the three passes and cancel. ``r`` is reliable
  only when the cold penalty ``p_cold - p_hot`` stands above the timing noise (the result says
  so); otherwise the profile keeps a neutral default and marks it an estimate. The single-block
  floor (the cold marginal pass minus its roofline time) is kept in ``meta`` only: on a shared
  machine it drowns in the timing noise of one pass;
* the matmul path as a model runs it (:func:`bench_path`), on the block shapes, with the weights
  of many distinct blocks streaming instead of one cache-hot matrix: ``mx.quantized_matmul`` with
  one row (decode) and many rows (prefill) per bits -> ``quantized_matmul_tflops_by_phase``, the
  figures the roofline divides by (on the CPU the cache-hot square figure is ~2x too optimistic);
  float GEMMs with tens of rows (weight-streaming bound) -> ``prefill_float_bandwidth_fraction``
  and with more rows (arithmetic bound) -> ``float_matmul_tflops_by_phase["prefill"]``;
* the per-layer floor (:func:`bench_layer_floor`): a chain of 16 distinct real blocks evaluated as
  one graph minus the same blocks' linears alone, median of paired repetitions, per block, pooled
  over quantized and float blocks, at least the op count x the per-op dispatch cost; and the same
  with a prefill chunk of many rows (128 on the CPU) on float blocks -> ``layer_row_us``, the cost
  of every row beyond the first (norms, RoPE, attention, activations).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from dupstudio.core.jobs import CancelToken, DupstudioError, ProgressFn, ensure
# the cached profile is read where profiles are resolved (roofline), written here after measuring
from dupstudio.core.roofline import (MIB, HardwareProfile, load_cached,  # noqa: F401
                                    load_profiles_doc, profile_path)

SCHEMA = 1

# The default model's block shapes (SmolLM2-135M).
SMOLLM2_BLOCK = {"hidden_size": 576, "intermediate_size": 1536, "num_heads": 9, "num_kv_heads": 3,
                 "head_dim": 64}

# Sizes per backend: the CPU backend is slow at quantized matmul (no BLAS path), so it gets small shapes.
SIZES = {
    "cpu": {"stream_bytes": 128 * MIB, "matmul_n": 1024, "qmv_kn": 2048, "qmm_kn": 1024, "qmm_m": 32,
            "block_trials": 5, "max_flush_bytes": 256 * MIB,
            "path_min_bytes": 24 * MIB, "path_max_blocks": 32, "path_prefill_blocks": 2,
            "floor_blocks": 16, "floor_row_blocks": 4, "floor_repeats": 11, "floor_row_repeats": 7},
    "gpu": {"stream_bytes": 512 * MIB, "matmul_n": 4096, "qmv_kn": 4096, "qmm_kn": 4096, "qmm_m": 512,
            "block_trials": 9, "max_flush_bytes": 1024 * MIB,
            "path_min_bytes": 256 * MIB, "path_max_blocks": 256, "path_prefill_blocks": 8,
            "floor_blocks": 16, "floor_row_blocks": 8, "floor_repeats": 9, "floor_row_repeats": 5},
    # tests: structure only
    "tiny": {"stream_bytes": 1 * MIB, "matmul_n": 64, "qmv_kn": 128, "qmm_kn": 128, "qmm_m": 4,
             "block_trials": 2, "max_flush_bytes": 1 * MIB,
             "path_min_bytes": 0, "path_max_blocks": 1, "path_prefill_blocks": 1,
             "floor_blocks": 2, "floor_row_blocks": 1, "floor_repeats": 2, "floor_row_repeats": 2},
}


# --------------------------------------------------------------------------- environment
def backend() -> str:
    """``cpu``, ``metal`` or ``cuda``: where MLX runs by default."""
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        return "cpu"
    try:
        if mx.metal.is_available():
            return "metal"
    except Exception:  # pragma: no cover - depends on the build
        pass
    return "cuda"


def device_name() -> str:
    import mlx.core as mx

    try:
        info = mx.device_info()
        return str(info.get("device_name") or info.get("architecture") or "")
    except Exception:  # pragma: no cover - older MLX
        return ""


def _compute_dtype():
    import mlx.core as mx

    return mx.float32 if mx.default_device() == mx.cpu else mx.float16


def last_level_cache_bytes() -> tuple[Optional[int], str]:
    """(bytes, how it was found) of the last-level cache the active backend sees."""
    be = backend()
    if be == "cpu" and sys.platform.startswith("linux"):
        best, lvl = None, -1
        base = Path("/sys/devices/system/cpu/cpu0/cache")
        for idx in sorted(base.glob("index*")):
            try:
                level = int((idx / "level").read_text())
                kind = (idx / "type").read_text().strip()
                size = (idx / "size").read_text().strip()
            except (OSError, ValueError):
                continue
            if kind == "Instruction":
                continue
            mult = {"K": 1024, "M": MIB, "G": 1 << 30}.get(size[-1].upper(), 1)
            n = int(size[:-1]) * mult if size[-1].isalpha() else int(size)
            if level > lvl:
                best, lvl = n, level
        if best:
            return best, f"sysfs: L{lvl} of cpu0 ({best // 1024} KiB)"
    # Apple GPU / CPU or a known datacenter GPU: match the chip name against the profiles file
    prof = matching_profile(device_name())
    if prof is not None:
        return int(prof.cache_bytes), f"{prof.name} profile ({prof.sources['cache_mb']['source']})"
    if sys.platform == "darwin":  # pragma: no cover - macOS only
        import subprocess

        for key in ("hw.l3cachesize", "hw.perflevel0.l2cachesize", "hw.l2cachesize"):
            try:
                out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5)
                n = int(out.stdout.strip() or 0)
            except (OSError, ValueError, subprocess.SubprocessError):
                n = 0
            if n:
                return n, f"sysctl {key}"
    return None, "unknown"


def matching_profile(name: str) -> Optional[HardwareProfile]:
    """The published profile whose chip MLX's device name names (longest match), or None."""
    name = (name or "").lower()
    if not name:
        return None
    try:
        doc = load_profiles_doc()
    except DupstudioError:
        return None
    best, best_len = None, 0
    for key, d in doc["profiles"].items():
        keys = d.get("device_match") or [str(d.get("label", key)).split(" (")[0]]
        for k in keys:
            if k and k.lower() in name and len(k) > best_len:
                best, best_len = key, len(k)
    return HardwareProfile.from_json(best, doc["profiles"][best]) if best else None


# --------------------------------------------------------------------------- timing
def _best_time(fn: Callable[[], None], repeats: int = 3, warmup: int = 1,
               cancel: Optional[CancelToken] = None) -> float:
    """Best of ``repeats`` wall times (interference from other processes only ever adds time)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(max(1, repeats)):
        if cancel is not None:
            cancel.check()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def _robust_sd(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    med = statistics.median(xs)
    return 1.4826 * statistics.median(abs(x - med) for x in xs)


# --------------------------------------------------------------------------- micro-benchmarks
def bench_bandwidth(nbytes: int = 128 * MIB, repeats: int = 3,
                    cancel: Optional[CancelToken] = None) -> dict:
    """Streaming bandwidth (GB/s = 1e9 B/s): sum (read), copy (read + write), fp32 GEMV (read)."""
    import mlx.core as mx

    n = max(1024, int(nbytes) // 4)
    side = max(32, int(math.isqrt(n)))
    a = mx.random.uniform(shape=(n,))
    w = mx.random.uniform(shape=(side, side))
    v = mx.random.uniform(shape=(side,))
    mx.eval(a, w, v)
    t_sum = _best_time(lambda: mx.eval(a.sum()), repeats, cancel=cancel)
    t_copy = _best_time(lambda: mx.eval(a * 1.0001), repeats, cancel=cancel)
    t_gemv = _best_time(lambda: mx.eval(w @ v), repeats, cancel=cancel)
    out = {"bytes": a.nbytes, "read_sum_gbs": a.nbytes / t_sum / 1e9,
           "copy_gbs": 2 * a.nbytes / t_copy / 1e9, "gemv_gbs": w.nbytes / t_gemv / 1e9}
    out["best_gbs"] = max(out["read_sum_gbs"], out["copy_gbs"], out["gemv_gbs"])
    del a, w, v
    return out


def bench_matmul(n: int = 1024, dtype: str = "float32", repeats: int = 3,
                 cancel: Optional[CancelToken] = None) -> dict:
    """Square matmul throughput (TFLOPS = 1e12 FLOP/s)."""
    import mlx.core as mx

    dt = getattr(mx, dtype)
    a = mx.random.normal((n, n)).astype(dt)
    b = mx.random.normal((n, n)).astype(dt)
    mx.eval(a, b)
    t = _best_time(lambda: mx.eval(a @ b), repeats, cancel=cancel)
    return {"n": n, "dtype": dtype, "seconds": t, "tflops": 2 * n ** 3 / t / 1e12}


def bench_quantized_matmul(bits: int, k: int = 2048, n: int = 2048, m: int = 1, group_size: int = 64,
                           repeats: int = 3, cancel: Optional[CancelToken] = None) -> dict:
    """``mx.quantized_matmul`` of (m, k) activations with an (n, k) quantized weight: TFLOPS and the
    weight bytes streamed per second (GB/s)."""
    import mlx.core as mx

    dt = _compute_dtype()
    w = mx.random.normal((n, k)).astype(dt)
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    x = mx.random.normal((m, k)).astype(dt)
    mx.eval(wq, scales, biases, x)
    del w

    def run():
        mx.eval(mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=group_size, bits=bits))

    t = _best_time(run, repeats, cancel=cancel)
    wbytes = wq.nbytes + scales.nbytes + biases.nbytes
    return {"bits": bits, "group_size": group_size, "m": m, "k": k, "n": n, "seconds": t,
            "tflops": 2 * m * k * n / t / 1e12, "weight_gbs": wbytes / t / 1e9}


def _block_mats(shape: dict) -> list[tuple[int, int]]:
    """(out, in) of the seven linears of one llama block."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    q, kv = shape["num_heads"] * shape["head_dim"], shape["num_kv_heads"] * shape["head_dim"]
    return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]


def bench_path(bits: Optional[int], m: int = 1, shape: Optional[dict] = None, group_size: int = 64,
               min_bytes: int = 24 * MIB, max_blocks: int = 32, min_blocks: int = 1, repeats: int = 3,
               cancel: Optional[CancelToken] = None) -> dict:
    """The matmul path as a model runs it: the seven linears of ``n`` distinct llama blocks of
    ``shape`` (default: the default model's), ``m`` activation rows each, all in one ``mx.eval``
    (one graph, as a forward pass), with enough distinct blocks (``min_bytes`` of weights, at most
    ``max_blocks``) that the weights stream through the memory hierarchy as a model's layers do
    instead of staying in a private cache. ``bits``: quantized (``mx.quantized_matmul``, fp16-rounded
    scales in the compute dtype) or None: float weights in the compute dtype (``x @ W.T``).

    Returns TFLOPS (FLOPs / time) and weight GB/s (weight bytes / time): on the CPU backend the
    quantized kernel is compute-bound at a few GFLOP/s, and a float GEMM with few rows (tens) is
    bound by streaming (packing) its weights, with more rows by arithmetic below the square-matmul
    peak."""
    import mlx.core as mx

    shape = dict(shape or SMOLLM2_BLOCK)
    dt = _compute_dtype()
    mats = _block_mats(shape)
    n_w = sum(o * i for o, i in mats)
    per_block = n_w * (bits / 8 + 4 / group_size * (dt.size / 2)) if bits else n_w * dt.size
    nb = int(min(max_blocks, max(min_blocks, math.ceil(min_bytes / per_block))))
    mx.random.seed(7)
    weights = []
    for _ in range(nb):
        for o, i in mats:
            w = mx.random.normal((o, i)).astype(dt) * 0.02
            if bits:
                wq, sc, bi = mx.quantize(w, group_size=group_size, bits=bits)
                weights.append((i, (wq, sc.astype(mx.float16).astype(dt), bi.astype(mx.float16).astype(dt))))
            else:
                weights.append((i, (w,)))
            mx.eval(weights[-1][1])
    xs = {i: mx.random.normal((m, i)).astype(dt) for i in {i for _, i in mats}}
    mx.eval(list(xs.values()))

    def run():
        if bits:
            outs = [mx.quantized_matmul(xs[i], *w, transpose=True, group_size=group_size, bits=bits)
                    for i, w in weights]
        else:
            outs = [xs[i] @ w[0].T for i, w in weights]
        mx.eval(outs)

    t = _best_time(run, repeats, cancel=cancel)
    wbytes = sum(sum(a.nbytes for a in w) for _, w in weights)
    del weights
    return {"bits": bits, "m": m, "blocks": nb, "shape": shape, "group_size": group_size, "seconds": t,
            "tflops": 2 * m * n_w * nb / t / 1e12, "weight_bytes": wbytes, "weight_gbs": wbytes / t / 1e9}


def bench_dispatch(chain_lengths: Sequence[int] = (1, 16, 64), repeats: int = 15,
                   cancel: Optional[CancelToken] = None) -> dict:
    """Time per ``mx.eval`` of a chain of N tiny elementwise ops; least-squares fit
    ``t = per_eval + N * per_op`` (microseconds)."""
    import mlx.core as mx

    x = mx.zeros((8,))
    mx.eval(x)

    def chain(n):
        y = x
        for _ in range(n):
            y = y + 1
        mx.eval(y)

    pts = [(n, _best_time(lambda n=n: chain(n), repeats, warmup=2, cancel=cancel) * 1e6)
           for n in chain_lengths]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if len(set(xs)) >= 2:
        mx_, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((a - mx_) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx_) ** 2 for a in xs)
        icpt = my - slope * mx_
    else:
        slope, icpt = ys[0] / max(xs[0], 1), 0.0
    return {"points_us": [{"ops": a, "us": b} for a, b in pts], "per_op_us": max(slope, 0.0),
            "per_eval_us": max(icpt, 0.0)}


def _make_block(shape: dict, bits: int, group_size: int, seed: int):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.models.llama import ModelArgs, TransformerBlock

    args = ModelArgs(model_type="llama", hidden_size=shape["hidden_size"], num_hidden_layers=1,
                     intermediate_size=shape["intermediate_size"], num_attention_heads=shape["num_heads"],
                     num_key_value_heads=shape["num_kv_heads"], head_dim=shape["head_dim"],
                     rms_norm_eps=1e-5, vocab_size=32)
    mx.random.seed(seed)
    blk = TransformerBlock(args)
    dt = _compute_dtype()
    blk.update(tree_map(lambda a: a.astype(dt), blk.parameters()))
    if bits < 16:
        nn.quantize(blk, group_size=group_size, bits=bits)
    mx.eval(blk.parameters())
    nbytes = sum(v.nbytes for _, v in tree_flatten(blk.parameters()))
    return blk, nbytes


def bench_layer_floor(shape: Optional[dict] = None, bits: Optional[int] = 2, group_size: int = 64,
                      n_blocks: int = 8, rows: int = 1, context: int = 16, repeats: int = 5,
                      cancel: Optional[CancelToken] = None) -> dict:
    """The per-layer cost that the matmuls do not explain, measured on a chain of ``n_blocks``
    distinct real llama blocks (mlx-lm ``TransformerBlock``; quantized with ``mlx.nn.quantize`` at
    ``bits``, or float with None), ``rows`` tokens per pass (1: a decode step with ``context``
    positions in the KV cache; more: a prefill chunk from an empty cache, causal mask), evaluated as
    one graph like a model's forward pass, against the same blocks' seven linears alone (same
    arrays, same inputs' shapes, one graph, each after the previous one as in the model).
    Repetitions alternate the two; the floor is the median of the paired differences /
    ``n_blocks``: norms, RoPE, attention, activations, residual adds, graph building and dispatch,
    i.e. what the roofline's per-pass floor term stands for. A chain of many blocks, not the
    marginal pass of one, keeps the estimate above the timing noise of a shared machine."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    shape = dict(shape or SMOLLM2_BLOCK)
    dt = _compute_dtype()
    blks = [_make_block(shape, bits if bits else 16, group_size, seed=100 + j)[0] for j in range(max(1, n_blocks))]
    kvh, hd = shape["num_kv_heads"], shape["head_dim"]
    cap = 256 * math.ceil((context + 1) / 256)

    def new_cache():
        c = KVCache()
        if rows == 1 and context > 0:
            c.keys = mx.random.normal((1, kvh, cap, hd)).astype(dt)
            c.values = mx.random.normal((1, kvh, cap, hd)).astype(dt)
            c.offset = context
        return c

    caches = [new_cache() for _ in blks]
    mx.eval([c.keys for c in caches if c.keys is not None], [c.values for c in caches if c.values is not None])
    x = mx.random.normal((1, rows, shape["hidden_size"])).astype(dt)
    xi = mx.random.normal((1, rows, shape["intermediate_size"])).astype(dt)
    xq = mx.random.normal((1, rows, shape["num_heads"] * hd)).astype(dt)
    mx.eval(x, xi, xq)
    mask = "causal" if rows > 1 else None

    def full():
        for c in caches:
            if rows == 1:
                c.offset = context
            else:
                c.keys = c.values = None
                c.offset = 0
        t0 = time.perf_counter()
        h = x
        for b, c in zip(blks, caches):
            h = b(h, mask, cache=c)
        mx.eval(h)
        return time.perf_counter() - t0

    def mm():  # the linears in the model's order, each after the previous one (mx.depends)
        t0 = time.perf_counter()
        prev = None
        for b in blks:
            a, f = b.self_attn, b.mlp
            for lin, inp in ((a.q_proj, x), (a.k_proj, x), (a.v_proj, x), (a.o_proj, xq), (f.gate_proj, x),
                             (f.up_proj, x), (f.down_proj, xi)):
                prev = lin(inp if prev is None else mx.depends(inp, prev))
        mx.eval(prev)
        return time.perf_counter() - t0

    full(), mm()  # warm up
    t_full, t_mm = [], []
    for _ in range(max(1, repeats)):
        if cancel is not None:
            cancel.check()
        t_full.append(full())
        t_mm.append(mm())
    n = len(blks)
    diffs = [(a - b) / n for a, b in zip(t_full, t_mm)]
    return {"bits": bits, "rows": rows, "context": context, "blocks": n, "shape": shape,
            "full_s": statistics.median(t_full) / n, "matmuls_s": statistics.median(t_mm) / n,
            "floor_s": max(0.0, statistics.median(diffs)), "diffs_s": diffs}


def _flusher(nbytes: int):
    """A function that streams ``nbytes`` through the memory hierarchy (evicting the caches)."""
    import mlx.core as mx

    if backend() == "cpu":
        import numpy as np

        buf = np.ones(max(1, nbytes // 8), dtype=np.float64)
        return lambda: float(buf.sum())
    buf = mx.ones((max(1, nbytes // 4),), dtype=mx.float32)
    mx.eval(buf)
    return lambda: mx.eval(buf.sum())


def graph_ops(*outputs) -> int:
    """Primitive nodes in the (unevaluated) graph of ``outputs``: roughly the kernels an eval runs."""
    import io
    import re

    import mlx.core as mx

    buf = io.StringIO()
    try:
        mx.export_to_dot(buf, *outputs)
    except Exception:  # pragma: no cover - older MLX
        return 0
    return len(re.findall(r'label ?= ?"[^"]*", shape=rectangle', buf.getvalue()))


def block_flops(shape: dict, context: int) -> float:
    """FLOPs of one decode pass of one block (linears + attention scores/values)."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    q, kv = shape["num_heads"] * shape["head_dim"], shape["num_kv_heads"] * shape["head_dim"]
    n_lin = 2 * q * h + 2 * kv * h + 3 * h * i
    return 2 * n_lin + 4 * q * (context + 1)


def bench_block(shape: Optional[dict] = None, bits: int = 2, group_size: int = 64, context: int = 16,
                trials: int = 5, flush_bytes: int = 256 * MIB, bandwidth_gbs: Optional[float] = None,
                quantized_tflops: Optional[float] = None, per_op_us: Optional[float] = None,
                cancel: Optional[CancelToken] = None) -> dict:
    """Decode-step timings of a real llama block: cold, second-pass and hot marginal passes, the
    second-pass ratio ``r`` and the per-layer floor (see the module docstring)."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    shape = dict(shape or SMOLLM2_BLOCK)
    blk_a, nbytes = _make_block(shape, bits, group_size, seed=1)
    blk_b, _ = _make_block(shape, bits, group_size, seed=2)
    dt = _compute_dtype()
    kvh, hd = shape["num_kv_heads"], shape["head_dim"]
    cap = 256 * math.ceil((context + 1) / 256)

    def new_cache():
        c = KVCache()
        c.keys = mx.random.normal((1, kvh, cap, hd)).astype(dt)
        c.values = mx.random.normal((1, kvh, cap, hd)).astype(dt)
        c.offset = context
        return c

    caches = [new_cache(), new_cache()]
    kv_bytes = 2 * kvh * hd * (context + 1) * caches[0].keys.itemsize  # read per pass
    x = mx.random.normal((1, 1, shape["hidden_size"])).astype(dt)
    mx.eval(x, *[c.keys for c in caches], *[c.values for c in caches])
    flush = _flusher(flush_bytes)

    def run(blocks):  # times graph building too: it is part of a real model's per-layer cost
        for c in caches:
            c.offset = context
        t0 = time.perf_counter()
        h = x
        for blk, c in zip(blocks, caches):
            h = blk(h, cache=c)
        mx.eval(h)
        return time.perf_counter() - t0

    for c in caches:
        c.offset = context
    n_ops = graph_ops(blk_a(x, cache=caches[0]))  # ops of one pass, as the backend runs it

    seqs = {"one": [blk_a], "same": [blk_a, blk_a], "diff": [blk_a, blk_b]}
    cold = {k: [] for k in seqs}
    hot = {"one": [], "same": []}
    for k in seqs:  # warm up (kernels, allocator)
        run(seqs[k])
    for _ in range(max(1, trials)):
        if cancel is not None:
            cancel.check()
        for k in seqs:
            flush()
            cold[k].append(run(seqs[k]))
        for k in hot:
            run(seqs[k])
            hot[k].append(run(seqs[k]))
    med = {f"cold_{k}": min(v) for k, v in cold.items()}  # best of trials: interference only adds
    med.update({f"hot_{k}": min(v) for k, v in hot.items()})
    p_cold = med["cold_diff"] - med["cold_one"]
    p_second = med["cold_same"] - med["cold_one"]
    p_hot = med["hot_same"] - med["hot_one"]
    penalty = p_cold - p_hot
    noise = math.sqrt(_robust_sd(cold["diff"]) ** 2 + _robust_sd(cold["one"]) ** 2
                      + _robust_sd(hot["same"]) ** 2 + _robust_sd(hot["one"]) ** 2) / math.sqrt(len(cold["one"]))
    r_raw = (p_second - p_hot) / penalty if penalty > 0 else float("nan")
    # reliable: the cold penalty stands above the noise, and r lands near its physical range
    reliable = (penalty > 3 * noise and penalty > 0.02 * max(p_cold, 1e-9)
                and math.isfinite(r_raw) and -0.25 <= r_raw <= 1.25)
    r = min(1.0, max(0.0, r_raw)) if math.isfinite(r_raw) else float("nan")
    flops = block_flops(shape, context)
    roof = 0.0
    if bandwidth_gbs:
        roof = max(roof, (nbytes + kv_bytes) / (bandwidth_gbs * 1e9))
    if quantized_tflops:
        roof = max(roof, flops / (quantized_tflops * 1e12))
    floor_residual = max(0.0, p_cold - roof)
    floor_dispatch = n_ops * (per_op_us or 0.0) * 1e-6
    floor = max(floor_residual, floor_dispatch)
    return {
        "shape": shape, "bits": bits, "group_size": group_size, "context": context, "trials": trials,
        "weight_bytes": nbytes, "kv_bytes_per_pass": kv_bytes, "flops_per_pass": flops,
        "flush_bytes": flush_bytes, "best_s": med,
        "p_cold_s": p_cold, "p_second_s": p_second, "p_hot_s": p_hot, "cold_penalty_s": penalty,
        "noise_s": noise, "second_pass_ratio_raw": r_raw, "second_pass_ratio": r, "reliable": bool(reliable),
        "second_pass_time_ratio": p_second / p_cold if p_cold > 0 else float("nan"),
        "roofline_s": roof, "ops_per_pass": n_ops, "floor_residual_s": floor_residual,
        "floor_dispatch_s": floor_dispatch, "floor_s": floor,
    }


# --------------------------------------------------------------------------- the profile
def measure(progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None, *,
            sizes: Optional[str] = None, block_shape: Optional[dict] = None, bits: Sequence[int] = (2, 4),
            group_size: int = 64) -> HardwareProfile:
    """Run the micro-benchmark on the active backend and return the measured profile."""
    import mlx.core as mx

    progress, cancel = ensure(progress, cancel)
    be = backend()
    sz = SIZES[sizes or ("cpu" if be == "cpu" else "gpu")]
    t_start = time.perf_counter()
    llc, llc_src = last_level_cache_bytes()
    flush_bytes = int(min(sz["max_flush_bytes"], max(2 * (llc or 32 * MIB), 32 * MIB)))
    if sizes == "tiny":
        flush_bytes = sz["max_flush_bytes"]
    steps = 7 + len(bits)
    done = [0]

    def step(msg):
        cancel.check()
        progress(done[0] / steps, msg)
        done[0] += 1

    step("memory bandwidth")
    bw = bench_bandwidth(sz["stream_bytes"], cancel=cancel)
    step("matmul throughput")
    mm32 = bench_matmul(sz["matmul_n"], "float32", cancel=cancel)
    mm16 = bench_matmul(sz["matmul_n"], "float16", cancel=cancel) if be != "cpu" else None
    step("quantized matmul throughput")
    qmm = []
    for b in bits:
        qmm.append(bench_quantized_matmul(b, sz["qmv_kn"], sz["qmv_kn"], 1, group_size, cancel=cancel))
        qmm.append(bench_quantized_matmul(b, sz["qmm_kn"], sz["qmm_kn"], sz["qmm_m"], group_size, cancel=cancel))
    q_by_bits = {b: max(r["tflops"] for r in qmm if r["bits"] == b) for b in bits}
    step("the matmul path as a model streams it")
    # per phase, on the model's block shapes with its weights streaming (not cache-hot): decode runs
    # one-row products, prefill many-row ones; the phase figures are what the roofline uses
    path_kw = dict(shape=block_shape, group_size=group_size, min_bytes=sz["path_min_bytes"],
                   max_blocks=sz["path_max_blocks"], cancel=cancel)
    pre_kw = dict(path_kw, min_bytes=0, max_blocks=sz["path_prefill_blocks"], min_blocks=sz["path_prefill_blocks"])
    path = {"decode": {b: bench_path(b, 1, **path_kw) for b in bits},
            "prefill": {b: bench_path(b, sz["qmm_m"], **pre_kw) for b in bits},
            "float_decode": bench_path(None, 1, **path_kw),
            # a float GEMM with few rows is bound by streaming (packing) its weights, with many rows by
            # arithmetic: the first gives the prefill float bandwidth fraction, the second the rate
            "float_prefill": bench_path(None, sz["qmm_m"], **pre_kw),
            "float_prefill_rows": bench_path(None, 4 * sz["qmm_m"], **pre_kw)}
    q_by_phase = {ph: {b: path[ph][b]["tflops"] for b in bits} for ph in ("decode", "prefill")}
    step("dispatch cost")
    disp = bench_dispatch(cancel=cancel)
    step("per-layer floor")
    floor_dec = bench_layer_floor(block_shape, min(bits), group_size, n_blocks=sz["floor_blocks"], rows=1,
                                  repeats=sz["floor_repeats"], cancel=cancel)
    # the per-row part (prefill chunks of many tokens) on float blocks: the non-matmul work is the same
    # whatever the linears are, and float blocks are quick to run with many rows on every backend
    floor_f1 = bench_layer_floor(block_shape, None, group_size, n_blocks=sz["floor_blocks"], rows=1,
                                 repeats=sz["floor_repeats"], cancel=cancel)
    # a prefill chunk of 4 x qmm_m rows (128 on the CPU), as the float GEMM rate: the per-row cost grows
    # once a chunk's activations leave the private caches, so a short chunk would understate it
    row_n = 4 * sz["qmm_m"]
    floor_rows = bench_layer_floor(block_shape, None, group_size, n_blocks=sz["floor_row_blocks"],
                                   rows=row_n, repeats=sz["floor_row_repeats"], cancel=cancel)
    row_us = max(0.0, (floor_rows["floor_s"] - floor_f1["floor_s"]) / max(1, row_n - 1)) * 1e6
    blocks = []
    for b in bits:
        step(f"decode step of a {b}-bit llama block")
        blocks.append(bench_block(block_shape, b, group_size, trials=sz["block_trials"], flush_bytes=flush_bytes,
                                  bandwidth_gbs=bw["best_gbs"], quantized_tflops=q_by_phase["decode"][b],
                                  per_op_us=disp["per_op_us"], cancel=cancel))
    step("done")

    where = f"{be} ({device_name() or platform.processor() or 'unknown device'})"
    m = lambda what: {"source": f"measured on this machine, {where}: {what}", "estimate": False}  # noqa: E731
    sources = {
        "bandwidth_gbs": m("best of a {:.0f} MiB sum / copy / fp32 GEMV".format(bw["bytes"] / MIB)),
        "fp32_tflops": m(f"{mm32['n']}^3 float32 matmul"),
        "fp16_tflops": (m(f"{mm16['n']}^3 float16 matmul") if mm16 else
                        {"source": "not measured: float16 is not the compute dtype on the CPU backend; "
                                   "copies the float32 figure", "estimate": True}),
        "quantized_matmul_tflops": m("mx.quantized_matmul, best of decode (1 row) and prefill shapes, "
                                     f"{'/'.join(map(str, bits))} bits g{group_size}; the lowest-bits figure "
                                     "(cache-hot square matrices; the roofline uses the per-phase figures "
                                     "measured on the model's block shapes, streamed)"),
        "achievable_bandwidth_fraction": {"source": "1.0: the bandwidth figure is already a measured, "
                                                    "achieved streaming rate", "estimate": False},
        "achievable_bandwidth_fraction_fp16": m(
            "float GEMV streaming rate / the bandwidth figure (the float decode path is a GEMV): "
            "{:.2f} / {:.2f} GB/s".format(bw["gemv_gbs"], bw["best_gbs"])),
    }
    if llc:
        cache_mb = llc / MIB
        sources["cache_mb"] = {"source": f"detected: {llc_src}", "estimate": False}
    else:
        cache_mb = 8.0
        sources["cache_mb"] = {"source": "not detected; 8 MiB assumed", "estimate": True}
    # the floor: a chain of real blocks minus the same blocks' matmuls (bench_layer_floor), at least the
    # block's op count x the per-op dispatch cost (bench_block's single-block residual is kept in meta)
    pooled = statistics.median(floor_dec["diffs_s"] + floor_f1["diffs_s"])  # quantized and float chains alike
    floor_us = max(pooled, max(bk["floor_dispatch_s"] for bk in blocks)) * 1e6
    sources["layer_floor_us"] = m(
        "decode step of a chain of {} distinct llama blocks ({}; {}-bit and float) minus the same blocks' "
        "linears alone, median of the paired repetitions, per block; at least the op count x the per-op "
        "dispatch cost".format(floor_dec["blocks"], _shape_str(floor_dec["shape"]), min(bits)))
    # second-pass ratio: assign to in-cache or spill by whether the block fits the LLC
    rel = [bk for bk in blocks if bk["reliable"]]
    fits = all(bk["weight_bytes"] <= cache_mb * MIB for bk in blocks)
    figure = "second_pass_ratio_in_cache" if fits else "second_pass_ratio_spill"
    ratios = {"second_pass_ratio_in_cache": 0.5, "second_pass_ratio_spill": 1.0}
    sources["second_pass_ratio_in_cache"] = {"source": "default: a block that fits re-reads ~half as "
                                                       "expensively as from DRAM (not measured)", "estimate": True}
    sources["second_pass_ratio_spill"] = {"source": "default: a block larger than the cache is re-read in "
                                                    "full (not measured)", "estimate": True}
    if rel:
        ratios[figure] = statistics.fmean(bk["second_pass_ratio"] for bk in rel)
        sources[figure] = m("(p_second - p_hot) / (p_cold - p_hot) on a llama block ({}), {} bits".format(
            _shape_str(blocks[0]["shape"]), "/".join(str(bk["bits"]) for bk in rel)))
    else:
        sources[figure] = {"source": "measurement unreliable on this machine (the cold-read penalty is "
                                     "within the timing noise, e.g. the flush could not evict a very large "
                                     f"last-level cache); default {ratios[figure]} kept", "estimate": True}
    meta = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "mlx_version": mx.__version__,
        "mlx_lm_version": _mlx_lm_version(),
        "backend": be,
        "device": device_name(),
        "machine": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "duration_s": round(time.perf_counter() - t_start, 2),
        "sizes": sizes or ("cpu" if be == "cpu" else "gpu"),
        "measurements": {"bandwidth": bw, "matmul_fp32": mm32, "matmul_fp16": mm16, "quantized_matmul": qmm,
                         "path": path, "floor": {"decode": floor_dec, "float_rows_1": floor_f1,
                                                 "float_rows": floor_rows, "row_us": row_us},
                         "dispatch": disp, "blocks": blocks, "last_level_cache": {"bytes": llc, "source": llc_src}},
    }
    prof = HardwareProfile(
        name="machine", label=f"This machine ({where})", kind=f"measured-{be}",
        compute_dtype="float32" if be == "cpu" else "float16", cache_name="LLC",
        bandwidth_gbs=bw["best_gbs"], fp32_tflops=mm32["tflops"],
        fp16_tflops=(mm16 or mm32)["tflops"], quantized_matmul_tflops=q_by_bits[min(bits)],
        cache_mb=cache_mb, achievable_bandwidth_fraction=1.0,
        achievable_bandwidth_fraction_fp16=min(1.0, bw["gemv_gbs"] / bw["best_gbs"]),
        prefill_float_bandwidth_fraction=min(1.0, path["float_prefill"]["weight_gbs"] / bw["best_gbs"]),
        layer_floor_us=floor_us, layer_row_us=row_us,
        float_matmul_tflops_by_phase={"prefill": path["float_prefill_rows"]["tflops"]},
        second_pass_ratio_in_cache=ratios["second_pass_ratio_in_cache"],
        second_pass_ratio_spill=ratios["second_pass_ratio_spill"],
        quantized_matmul_tflops_by_bits=q_by_bits, quantized_matmul_tflops_by_phase=q_by_phase,
        sources=sources, meta=meta)
    progress(1.0, f"machine profile measured in {meta['duration_s']} s")
    return prof


def _shape_str(shape: dict) -> str:
    return "hidden {hidden_size}, inter {intermediate_size}, {num_heads}/{num_kv_heads} heads x {head_dim}".format(**shape)


def _mlx_lm_version() -> str:
    try:
        import mlx_lm

        return getattr(mlx_lm, "__version__", "")
    except Exception:  # pragma: no cover
        return ""


# --------------------------------------------------------------------------- cache
def save(prof: HardwareProfile, path: Optional[Path] = None) -> Path:
    from dupstudio.core.safeio import atomic_write_bytes

    path = Path(path) if path else profile_path()
    doc = _finite({"schema": SCHEMA, "name": prof.name, **prof.to_json()})
    atomic_write_bytes(path, json.dumps(doc, indent=2, allow_nan=False).encode())
    return path


def _finite(o):
    """Strict JSON: NaN / infinity (e.g. an undefined ratio) become null."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def is_current(prof: HardwareProfile) -> bool:
    """Was ``prof`` measured here, with this MLX version and backend?"""
    import mlx.core as mx

    meta = prof.meta or {}
    return (meta.get("mlx_version") == mx.__version__ and meta.get("backend") == backend()
            and meta.get("machine") == platform.node())


def load_or_measure(refresh: bool = False, progress: Optional[ProgressFn] = None,
                    cancel: Optional[CancelToken] = None, **measure_kw) -> HardwareProfile:
    """The cached profile when it was measured here with this MLX version and backend; otherwise
    (or with ``refresh``) measure now and cache it."""
    if not refresh:
        prof = load_cached()
        if prof is not None and is_current(prof):
            return prof
    prof = measure(progress, cancel, **measure_kw)
    save(prof)
    return prof


__all__ = ["backend", "device_name", "last_level_cache_bytes", "bench_bandwidth", "bench_matmul",
           "bench_quantized_matmul", "bench_dispatch", "bench_block", "block_flops", "measure", "load_cached",
           "load_or_measure", "save", "profile_path", "is_current", "SMOLLM2_BLOCK"]
