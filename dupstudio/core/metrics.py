"""Quantization error metrics per matrix, per block and per model.

Per matrix (:func:`matrix_metrics`): MSE, relative Frobenius error ``‖W-Ŵ‖/‖W‖``, SQNR in dB
(``10·log10(‖W‖²/‖W-Ŵ‖²)``), max |error|, the fraction of weights clipped (outside the group's
representable range ``[b, b + s·(2^bits-1)]``, ends ordered for negative scales), weight and error
histograms on fixed bins, and — given calibration activations ``X`` (n, in) — the relative output
error ``‖XWᵀ - XŴᵀ‖/‖XWᵀ‖`` (or, given only ``act_sq`` = mean square activation per input channel,
its diagonal estimate ``Σ act_sq·E² / Σ act_sq·W²``). Storage: bytes of codes + float16 scale and
bias per group, and effective bits per weight ``bits + 32/g``.

Aggregation (:func:`summarize_blocks`, :func:`summarize`) is parameter-weighted: MSE and clipped
fraction are totals over parameters, relative error and SQNR are computed from summed squared error
and summed ‖W‖², max |error| is the maximum.

:func:`quant_report` runs a strategy over every matrix of every decoder block and returns the tables.

Speed (``scripts/bench_quant.py``, ``benchmarks/results/quant-stats.json``): MLX quantizes; the
statistics are computed with NumPy on views of the evaluated arrays, in one sweep over slices of
rows (error, sums of squares as float32 dot products added in float64, max, clipping, histogram
indices counted with ``np.bincount``, exactly ``np.histogram``'s counts), in a worker thread while
MLX quantizes the next matrix.
"""
from __future__ import annotations

import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import mlx.core as mx
import numpy as np

from dupstudio.core import quant as Q
from dupstudio.core.jobs import CancelToken, DupstudioError, ProgressFn, ensure

#: Default fixed histogram edges (explicit, so histograms of different runs are comparable).
WEIGHT_BINS = np.linspace(-0.5, 0.5, 201)
ERROR_BINS = np.linspace(-0.1, 0.1, 201)

MATRIX_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MATRIX_COLUMNS = [
    "block", "matrix", "shape", "params", "bits_per_weight", "mse", "rel_fro", "sqnr_db",
    "max_abs", "clipped_frac",
]
BLOCK_COLUMNS = [
    "block", "matrices", "params", "bytes", "bits_per_weight", "mse", "rel_fro", "sqnr_db",
    "max_abs", "clipped_frac",
]


# ----------------------------------------------------------------------------------------------
# Storage
# ----------------------------------------------------------------------------------------------


def effective_bits(bits: int, group_size: int) -> float:
    """Bits per weight with a float16 scale and a float16 bias per group: ``bits + 32/g``."""
    return bits + 32.0 / group_size


def storage_bytes(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """Bytes of packed codes plus float16 scales and biases."""
    n_groups = out_features * (in_features // group_size)
    return out_features * in_features * bits // 8 + 4 * n_groups


# ----------------------------------------------------------------------------------------------
# Histograms
# ----------------------------------------------------------------------------------------------


#: Elements per slice of the NumPy passes below (a few float32 temporaries of this size stay in a
#: core's L2 cache; larger slices measured slower on the 2-core CPU, smaller ones pay Python
#: overhead per slice).
_CHUNK = 1 << 16
_EPS32 = float(np.finfo(np.float32).eps)
#: Threads measuring matrices with NumPy while the calling thread quantizes the next ones in MLX
#: (the statistics with histograms cost more than the quantization: two keep both cores busy).
_STATS_THREADS = 2


class _Binner:
    """Exact histogram counts of float32 data on float64 ``edges``, as ``np.histogram(x, edges)``
    counts them (bins ``[e_i, e_i+1)``, the last closed), plus the values below and above.

    For float32 ``x`` and a float64 edge ``e``: ``x >= e`` exactly when ``x >= ceil32(e)`` (the
    smallest float32 not below ``e``), and ``x <= e_n`` exactly when ``x < up32(floor32(e_n))``. So
    the bin index is the number of float32 thresholds ``T = [ceil32(e_0) … ceil32(e_{n-1}),
    up32(floor32(e_n))]`` at or below ``x`` (0 = below, ``n + 1`` = above or NaN). For (nearly)
    evenly spaced thresholds that count is ``floor`` of an affine map of ``x``, computed in float32;
    the few values whose image lies within ``tol`` of an integer (where float32 rounding could put
    them on the wrong side of a threshold) are looked up exactly with ``np.searchsorted``. Uneven
    edges use ``np.searchsorted`` for every value. ``np.bincount`` counts the indices — no sort,
    unlike ``np.histogram`` with explicit edges."""

    def __init__(self, edges):
        e = np.asarray(edges, dtype=np.float64)
        if e.ndim != 1 or e.size < 2 or np.any(np.diff(e) <= 0):
            raise DupstudioError("histogram edges must be a strictly increasing 1-D sequence")
        self.edges = e
        self.n = n = e.size - 1
        up, down = np.float32(np.inf), np.float32(-np.inf)
        with np.errstate(over="ignore"):
            c = e.astype(np.float32)
            c = np.where(c.astype(np.float64) < e, np.nextafter(c, up), c).astype(np.float32)
            last = np.float32(e[-1])
            if np.float64(last) > e[-1]:
                last = np.nextafter(last, down)
        self.thresholds = t = np.append(c[:-1], np.nextafter(last, up)).astype(np.float32)
        self.affine = None
        t64 = t.astype(np.float64)
        if np.all(np.isfinite(t64)):
            h = (t64[-1] - t64[0]) / n
            if h > 0:
                dev = float(np.max(np.abs(t64 - (t64[0] + h * np.arange(n + 1))))) / h
                # rounding of x·inv + off (two float32 operations on values up to |T0|/h + n + 2)
                # and of inv and off themselves, and the thresholds' distance from an even grid
                err = 8 * _EPS32 * (abs(t64[0]) / h + n + 2) + dev
                tol = max(1e-3, 4 * err)
                if tol < 0.05:
                    self.affine = (np.float32(1.0 / h), np.float32(1.0 - t64[0] / h),
                                   np.float32(0.5 - tol))

    def indices(self, x: np.ndarray) -> np.ndarray:
        """Bin index + 1 of every value of the float32 slice ``x`` (0 below, n + 1 above)."""
        if self.affine is None:
            return np.searchsorted(self.thresholds, x, side="right")
        inv, off, near = self.affine
        with np.errstate(over="ignore", invalid="ignore"):  # ±inf, and NaN → int (redone below)
            u = x * inv
            u += off
            np.clip(u, np.float32(0.5), np.float32(self.n + 1.5), out=u)  # NaN stays NaN
            fl = np.floor(u)
            k = fl.astype(np.int32)
        u -= fl
        u -= np.float32(0.5)
        np.abs(u, out=u)
        # near a threshold, or NaN (the comparison is False for NaN): the exact count
        redo = np.flatnonzero(~(u <= near))
        if redo.size:
            k[redo] = np.searchsorted(self.thresholds, x[redo], side="right")
        return k

    def new_counts(self) -> np.ndarray:
        return np.zeros(self.n + 2, dtype=np.int64)

    def add(self, counts: np.ndarray, x: np.ndarray) -> None:
        """Add the float32 slice ``x`` (1-D, any length) to ``counts`` (from :meth:`new_counts`)."""
        for i in range(0, x.size, _CHUNK):
            counts += np.bincount(self.indices(x[i:i + _CHUNK]), minlength=self.n + 2)

    def result(self, counts: np.ndarray) -> dict:
        total = int(counts.sum())
        below = int(counts[0])
        inside = counts[1:-1].copy()
        return {"counts": inside, "edges": self.edges, "below": below,
                "above": total - below - int(inside.sum())}


_BINNERS: dict = {}


def _binner(edges) -> _Binner:
    """A cached :class:`_Binner` for ``edges`` (the default edges are reused by every matrix)."""
    e = np.asarray(edges, dtype=np.float64)
    key = (e.size, e.tobytes()) if e.ndim == 1 and e.size <= 100_000 else None
    b = _BINNERS.get(key) if key is not None else None
    if b is None:
        b = _Binner(e)
        if key is not None:
            if len(_BINNERS) > 32:
                _BINNERS.clear()
            _BINNERS[key] = b
    return b


def histogram(x, edges=WEIGHT_BINS) -> dict:
    """Counts of ``x`` on the fixed ``edges`` (``np.histogram(x, bins=edges)``: bins
    ``[e_i, e_i+1)``, the last one closed; ``x`` is compared as float32). Values outside the edges
    are not in ``counts`` but counted in ``below`` / ``above`` (NaN counts as above)."""
    b = _binner(edges)
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float32)).ravel()
    counts = b.new_counts()
    b.add(counts, a)
    return b.result(counts)


# ----------------------------------------------------------------------------------------------
# Per matrix
# ----------------------------------------------------------------------------------------------


def sqnr_db(signal_sq: float, noise_sq: float) -> float:
    """``10·log10(signal/noise)`` of sums of squares; inf for zero noise."""
    if noise_sq <= 0:
        return math.inf
    if signal_sq <= 0:
        return -math.inf
    return 10.0 * math.log10(signal_sq / noise_sq)


def clipped_fraction(
    w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int,
    tol: float = 1e-3,
) -> float:
    """Fraction of weights outside their group's representable range ``[b, b + s·(2^bits-1)]``
    (ordered, so negative scales work) by more than ``tol`` steps (absorbs float rounding of the
    range ends)."""
    out_f, in_f = w.shape
    wg = w.astype(mx.float32).reshape(out_f, in_f // group_size, group_size)
    s = scales.astype(mx.float32)
    b = biases.astype(mx.float32)
    end = b + s * float((1 << bits) - 1)
    t = tol * mx.abs(s)
    lo = (mx.minimum(b, end) - t)[..., None]
    hi = (mx.maximum(b, end) + t)[..., None]
    n = ((wg < lo) | (wg > hi)).sum()
    return float(n.item()) / w.size


def error_metrics(w: mx.array, w_hat: mx.array) -> dict:
    """MSE, relative Frobenius error, SQNR (dB), max |error| of ``w_hat`` against ``w``.

    The error ``ŵ - w`` is formed in float32; the sums of squares are float32 dot products over
    slices, added in float64 (relative error ~1e-6; a float32 ``mx.sum`` over a whole matrix was
    off by up to ~4e-4)."""
    w = w.astype(mx.float32)
    w_hat = w_hat.astype(mx.float32)
    if tuple(w_hat.shape) != tuple(w.shape):
        w_hat = mx.broadcast_to(w_hat, w.shape)
    mx.eval(w, w_hat)
    wn, hn = _numpy(w).reshape(-1), _numpy(w_hat).reshape(-1)
    sse = wsq = 0.0
    mabs = np.float32(0.0)
    for i in range(0, wn.size, _CHUNK):
        wf = wn[i:i + _CHUNK]
        ef = hn[i:i + _CHUNK] - wf
        sse += float(np.dot(ef, ef))
        wsq += float(np.dot(wf, wf))
        mabs = np.maximum(mabs, np.maximum(ef.max(), -ef.min()))  # NaN propagates
    return _error_row(sse, wsq, float(mabs) + 0.0, w.size)


def _error_row(sse: float, wsq: float, max_abs: float, size: int) -> dict:
    return {
        "mse": sse / size,
        "rel_fro": math.sqrt(sse / wsq) if wsq > 0 else (0.0 if sse == 0 else math.inf),
        "sqnr_db": sqnr_db(wsq, sse),
        "max_abs": max_abs,
        "_sse": sse,
        "_wsq": wsq,
    }


def _clip_range(scales: np.ndarray, biases: np.ndarray, bits: int, tol: float = 1e-3):
    """Per-group ``(lo, hi)`` of :func:`clipped_fraction` (the same float32 operations)."""
    end = biases + scales * np.float32((1 << bits) - 1)
    t = np.float32(tol) * np.abs(scales)
    return np.minimum(biases, end) - t, np.maximum(biases, end) + t


def _numpy(a: mx.array) -> np.ndarray:
    """An evaluated MLX array as a C-contiguous NumPy array (a view when it already is one)."""
    return np.ascontiguousarray(np.asarray(a))


def _weight_stats(
    w: np.ndarray, codes: np.ndarray, scales: np.ndarray, biases: np.ndarray,
    lo: np.ndarray, hi: np.ndarray, group_size: int,
    bins: Optional[tuple] = None,
) -> dict:
    """Error sums, max |error|, clipped count and (``bins`` = (weight, error) :class:`_Binner`)
    histogram counts of one matrix, in one sweep over slices of rows with NumPy.

    ``w`` float32 (out, in); ``codes`` uint8 (out, in); ``scales``/``biases`` float32
    (out, in/group_size) as stored; ``lo``/``hi`` the clip range per group. ``ŵ = s·q + b`` and
    ``e = ŵ - w`` are formed with the same float32 operations as :meth:`QuantizedTensor.dequantize`
    and :func:`error_metrics` (identical values); the sums of squares are float32 dot products per
    slice added in float64, so they differ from MLX's float32 ``sum`` by rounding only."""
    out_f, in_f = w.shape
    ng = in_f // group_size
    step = max(1, _CHUNK // in_f)
    sse = wsq = 0.0
    mabs = np.float32(0.0)
    n_clip = 0
    counts = (bins[0].new_counts(), bins[1].new_counts()) if bins is not None else None
    for r0 in range(0, out_f, step):
        r1 = min(out_f, r0 + step)
        wg = w[r0:r1].reshape(r1 - r0, ng, group_size)
        e = codes[r0:r1].reshape(r1 - r0, ng, group_size).astype(np.float32)
        e *= scales[r0:r1, :, None]
        e += biases[r0:r1, :, None]
        e -= wg
        ef, wf = e.reshape(-1), wg.reshape(-1)
        sse += float(np.dot(ef, ef))
        wsq += float(np.dot(wf, wf))
        mabs = np.maximum(mabs, np.maximum(ef.max(), -ef.min()))  # NaN propagates, as in MLX
        n_clip += int(np.count_nonzero(wg < lo[r0:r1, :, None]))
        n_clip += int(np.count_nonzero(wg > hi[r0:r1, :, None]))
        if bins is not None:
            bins[0].add(counts[0], wf)
            bins[1].add(counts[1], ef)
    out = _error_row(sse, wsq, float(mabs) + 0.0, w.size)  # + 0.0: no -0.0
    out["clipped_frac"] = n_clip / w.size
    if bins is not None:
        out["weight_hist"] = bins[0].result(counts[0])
        out["error_hist"] = bins[1].result(counts[1])
    return out


def output_error(w: mx.array, w_hat: mx.array, x: mx.array) -> float:
    """Relative output error ``‖XWᵀ - XŴᵀ‖ / ‖XWᵀ‖`` for activations ``x`` (n, in)."""
    x = x.astype(mx.float32).reshape(-1, w.shape[1])
    w = w.astype(mx.float32)
    y = x @ w.T
    dy = x @ (w_hat.astype(mx.float32) - w).T
    num, den = mx.sum(dy * dy), mx.sum(y * y)
    mx.eval(num, den)
    den = float(den.item())
    return math.sqrt(float(num.item()) / den) if den > 0 else math.nan


def act_weighted_error(w: mx.array, w_hat: mx.array, act_sq) -> float:
    """Diagonal estimate of the relative output error: ``sqrt(Σ a_j E_ij² / Σ a_j W_ij²)``."""
    a = mx.array(act_sq).astype(mx.float32).reshape(1, -1)
    w = w.astype(mx.float32)
    e = w_hat.astype(mx.float32) - w
    num, den = mx.sum(a * e * e), mx.sum(a * w * w)
    mx.eval(num, den)
    den = float(den.item())
    return math.sqrt(float(num.item()) / den) if den > 0 else math.nan


def matrix_metrics(
    w: mx.array,
    qt: Q.QuantizedTensor,
    *,
    x: Optional[mx.array] = None,
    act_sq=None,
    histograms: bool = False,
    weight_bins=WEIGHT_BINS,
    error_bins=ERROR_BINS,
) -> dict:
    """All metrics of quantized ``qt`` against the float matrix ``w`` (out, in).

    The error uses the stored (float16) scales and biases — what actually runs. The clipped
    fraction uses the float32 strategy parameters when ``qt`` carries them (so float16 rounding of
    the range ends is not counted as clipping). Keys starting with ``_`` are sums used for
    aggregation.
    """
    row, stats, extra = _matrix_job(w, qt, x=x, act_sq=act_sq, histograms=histograms,
                                    weight_bins=weight_bins, error_bins=error_bins)
    return {**row, **stats(), **extra}


def _matrix_job(w, qt, *, x=None, act_sq=None, histograms=False, weight_bins=WEIGHT_BINS,
                error_bins=ERROR_BINS):
    """:func:`matrix_metrics` in two parts: the MLX work now (the row's storage columns, the
    activation errors, the arrays evaluated and viewed as NumPy arrays) and a function that
    computes the weight statistics from those NumPy arrays alone (no MLX call, so it may run in
    another thread while MLX quantizes the next matrix). Returns (row, stats function, extra)."""
    out_f, in_f = w.shape
    if qt.shape != (out_f, in_f):
        raise DupstudioError(f"quantized shape {qt.shape} does not match the matrix {w.shape}")
    row: dict[str, Any] = {
        "shape": f"{out_f}x{in_f}",
        "params": out_f * in_f,
        "bits": qt.bits,
        "group_size": qt.group_size,
        "bits_per_weight": 8.0 * qt.nbytes / (out_f * in_f),
        "bytes": qt.nbytes,
    }
    # The error uses the stored (float16) scales and biases, what runs; the clipped fraction the
    # float32 strategy parameters when qt carries them (float16 rounding of the range ends is not
    # clipping), as clipped_fraction() would be called.
    p = qt.params
    s, b = (p.scales, p.biases) if p is not None else (qt.scales, qt.biases)
    w32 = w.astype(mx.float32)
    arrays = [w32, qt.get_codes(), qt.scales.astype(mx.float32), qt.biases.astype(mx.float32),
              s.astype(mx.float32), b.astype(mx.float32)]
    mx.eval(*arrays)
    wn, codes, scales, biases, ps, pb = (_numpy(a) for a in arrays)
    bins = (_binner(weight_bins), _binner(error_bins)) if histograms else None
    extra = {}
    if x is not None or act_sq is not None:
        w_hat = qt.dequantize()
        if x is not None:
            extra["out_rel_err"] = output_error(w32, w_hat, x)
        if act_sq is not None:
            extra["act_rel_err"] = act_weighted_error(w32, w_hat, act_sq)
    bits, group_size = qt.bits, qt.group_size

    def stats() -> dict:
        lo, hi = _clip_range(ps, pb, bits)
        return _weight_stats(wn, codes, scales, biases, lo, hi, group_size, bins)

    return row, stats, extra


# ----------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------


def _aggregate(rows: Sequence[Mapping]) -> dict:
    params = sum(r["params"] for r in rows)
    nbytes = sum(r["bytes"] for r in rows)
    sse = sum(r["_sse"] for r in rows)
    wsq = sum(r["_wsq"] for r in rows)
    out = {
        "matrices": len(rows),
        "params": params,
        "bytes": nbytes,
        "bits_per_weight": 8.0 * nbytes / params if params else math.nan,
        "mse": sse / params if params else math.nan,
        "rel_fro": math.sqrt(sse / wsq) if wsq > 0 else math.nan,
        "sqnr_db": sqnr_db(wsq, sse),
        "max_abs": max((r["max_abs"] for r in rows), default=math.nan),
        "clipped_frac": (
            sum(r["clipped_frac"] * r["params"] for r in rows) / params if params else math.nan
        ),
    }
    for key in ("out_rel_err", "act_rel_err"):
        vals = [(r[key], r["params"]) for r in rows if key in r and r[key] == r[key]]
        if vals:  # parameter-weighted RMS of the per-matrix relative errors
            out[key] = math.sqrt(sum(v * v * n for v, n in vals) / sum(n for _, n in vals))
    return out


def summarize_blocks(rows: Sequence[Mapping]) -> list[dict]:
    """One parameter-weighted summary row per ``block`` value of the per-matrix rows."""
    by_block: dict[Any, list] = {}
    for r in rows:
        by_block.setdefault(r["block"], []).append(r)
    return [{"block": blk, **_aggregate(rs)} for blk, rs in by_block.items()]


def summarize(rows: Sequence[Mapping]) -> dict:
    """Parameter-weighted summary of all rows."""
    return _aggregate(rows)


# ----------------------------------------------------------------------------------------------
# Whole-model report
# ----------------------------------------------------------------------------------------------


def public(row: Mapping) -> dict:
    """A row without the ``_`` aggregation sums and histograms."""
    return {k: v for k, v in row.items() if not k.startswith("_") and not k.endswith("_hist")}


@dataclass
class QuantReport:
    matrices: list[dict]
    blocks: list[dict]
    total: dict
    settings: dict
    elapsed_s: float = 0.0
    quantized: Optional[list] = field(default=None, repr=False)

    def matrices_frame(self):
        import pandas as pd

        df = pd.DataFrame([public(r) for r in self.matrices])
        cols = [c for c in MATRIX_COLUMNS if c in df] + [c for c in df if c not in MATRIX_COLUMNS]
        return df[cols]

    def blocks_frame(self):
        import pandas as pd

        df = pd.DataFrame([public(r) for r in self.blocks])
        cols = [c for c in BLOCK_COLUMNS if c in df] + [c for c in df if c not in BLOCK_COLUMNS]
        return df[cols]

    def to_json_dict(self) -> dict:
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, (np.integer,)):
                return int(v)
            if isinstance(v, (np.floating,)):
                return clean(float(v))
            if isinstance(v, np.ndarray):
                return [clean(x) for x in v.tolist()]
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v

        return clean({
            "matrices": [public(r) for r in self.matrices],
            "blocks": [public(r) for r in self.blocks],
            "total": public(self.total),
            "settings": {**self.settings, "elapsed_s": round(self.elapsed_s, 3)},
        })


def _matrix_names(blk: Mapping) -> list:
    """A block's matrices in report order: llama's q, k, v, o, gate, up, down whatever the
    mapping's order, and another architecture's (phi3's fused qkv_proj, o_proj, gate_up_proj,
    down_proj) in its own order, as ``block_linears`` lists them."""
    if all(n in MATRIX_ORDER for n in blk):
        return [n for n in MATRIX_ORDER if n in blk]
    return list(blk)


def check_settings(
    blocks: Sequence[Mapping[str, mx.array]], bits, group_size, strategy, strategy_args=None
):
    """Validate bits, group size (against every matrix), strategy and its arguments up front."""
    bits = Q.check_bits(bits)
    g = Q.parse_group_size(group_size)
    if strategy not in Q.STRATEGIES:
        raise DupstudioError(
            f"unknown strategy {strategy!r}; choose from: {', '.join(Q.STRATEGIES)}"
        )
    allowed = Q.strategy_params(strategy)
    unknown = sorted(set(strategy_args or {}) - set(allowed))
    if unknown:
        raise DupstudioError(
            f"strategy {strategy!r} has no argument(s) {', '.join(unknown)}; it accepts: "
            f"{', '.join(f'{k}={v!r}' for k, v in allowed.items()) or 'none'}"
        )
    widths = sorted({int(m.shape[1]) for blk in blocks for m in blk.values()})
    common = [s for s in (*Q.GROUP_SIZES, Q.CHANNEL)
              if all(s in Q.valid_group_sizes(wd) for wd in widths)]
    if g not in common:
        raise DupstudioError(
            f"group size {g} does not divide every row width of the model ({', '.join(map(str, widths))}); "
            f"valid: {', '.join(map(str, common)) or 'none'}"
        )
    return bits, g


def quant_report(
    blocks: Sequence[Mapping[str, mx.array]],
    bits: int,
    group_size,
    strategy: str = "minmax",
    strategy_args: Optional[Mapping[str, Any]] = None,
    *,
    act_sq: Optional[Sequence[Mapping[str, Any]]] = None,
    activations: Optional[Sequence[Mapping[str, mx.array]]] = None,
    histograms: bool = False,
    keep_quantized: bool = False,
    input_dtype=None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
) -> QuantReport:
    """Quantize every matrix of every block (``blocks[i]`` maps matrix name → float weight
    (out, in)) and measure it. ``act_sq`` / ``activations`` are optional parallel sequences of
    per-matrix mean-square activations (in,) / activation samples (n, in). ``input_dtype`` casts
    each matrix before quantizing (errors are still measured against the given weights)."""
    progress, cancel = ensure(progress, cancel)
    strategy_args = dict(strategy_args or {})
    bits, g = check_settings(blocks, bits, group_size, strategy, strategy_args)
    t0 = time.perf_counter()
    total = sum(len(b) for b in blocks)
    rows, quantized = [], []
    pending: deque = deque()  # matrices whose NumPy statistics run in the worker thread

    def finish_one():
        row, fut, extra, qt = pending.popleft()
        row.update(fut.result())
        row.update(extra)
        rows.append(row)
        if not keep_quantized:
            qt.codes = None
        progress(len(rows) / total, f"block {row['block']} {row['matrix']}")

    # MLX quantizes the next matrix (releasing the GIL while it evaluates) while worker threads
    # measure the previous ones with NumPy: both cores work. At most 2 matrices per worker wait.
    with ThreadPoolExecutor(max_workers=_STATS_THREADS, thread_name_prefix="quant-stats") as pool:
        try:
            for bi, blk in enumerate(blocks):
                names = _matrix_names(blk)
                qblk = {}
                for name in names:
                    cancel.check()
                    w = blk[name]
                    a = act_sq[bi].get(name) if act_sq is not None and bi < len(act_sq) else None
                    xs = (activations[bi].get(name)
                          if activations is not None and bi < len(activations) else None)
                    wq = w.astype(input_dtype) if input_dtype is not None else w
                    qt = Q.quantize(wq, bits, g, strategy, act_sq=a, keep_codes=True,
                                    **strategy_args)
                    row, stats, extra = _matrix_job(w, qt, x=xs, act_sq=a, histograms=histograms)
                    pending.append(({"block": bi, "matrix": name, **row}, pool.submit(stats),
                                    extra, qt))
                    while len(pending) > 2 * _STATS_THREADS:
                        finish_one()
                    if keep_quantized:
                        qblk[name] = qt
                if keep_quantized:
                    quantized.append(qblk)
            while pending:
                finish_one()
        finally:
            for _, fut, _, _ in pending:
                fut.cancel()
    settings = {
        "bits": bits,
        "group_size": g,
        "strategy": strategy,
        "strategy_args": strategy_args,
        "scale_dtype": "float16",
        "input_dtype": str(input_dtype).replace("mlx.core.", "") if input_dtype else None,
        "mlx_version": mx.__version__,
    }
    return QuantReport(
        matrices=rows,
        blocks=summarize_blocks(rows),
        total=summarize(rows),
        settings=settings,
        elapsed_s=time.perf_counter() - t0,
        quantized=quantized if keep_quantized else None,
    )
