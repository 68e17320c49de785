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
"""
from __future__ import annotations

import math
import time
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


def histogram(x, edges=WEIGHT_BINS) -> dict:
    """Counts of ``x`` on the fixed ``edges`` (``np.histogram(x, bins=edges)``: bins
    ``[e_i, e_i+1)``, the last one closed). Values outside the edges are not in ``counts`` but
    counted in ``below`` / ``above``."""
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise DupstudioError("histogram edges must be a strictly increasing 1-D sequence")
    a = np.asarray(x, dtype=np.float32).ravel()
    counts, _ = np.histogram(a, bins=edges)
    below = int(np.count_nonzero(a < edges[0]))
    above = a.size - below - int(counts.sum())
    return {"counts": counts.astype(np.int64), "edges": edges, "below": below, "above": above}


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
    """MSE, relative Frobenius error, SQNR (dB), max |error| of ``w_hat`` against ``w``."""
    w = w.astype(mx.float32)
    e = w_hat.astype(mx.float32) - w
    sse, wsq, mabs = mx.sum(e * e), mx.sum(w * w), mx.max(mx.abs(e))
    mx.eval(sse, wsq, mabs)
    sse, wsq = float(sse.item()), float(wsq.item())
    return {
        "mse": sse / w.size,
        "rel_fro": math.sqrt(sse / wsq) if wsq > 0 else (0.0 if sse == 0 else math.inf),
        "sqnr_db": sqnr_db(wsq, sse),
        "max_abs": float(mabs.item()),
        "_sse": sse,
        "_wsq": wsq,
    }


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
    out_f, in_f = w.shape
    if qt.shape != (out_f, in_f):
        raise DupstudioError(f"quantized shape {qt.shape} does not match the matrix {w.shape}")
    w32 = w.astype(mx.float32)
    w_hat = qt.dequantize()
    row: dict[str, Any] = {
        "shape": f"{out_f}x{in_f}",
        "params": out_f * in_f,
        "bits": qt.bits,
        "group_size": qt.group_size,
        "bits_per_weight": 8.0 * qt.nbytes / (out_f * in_f),
        "bytes": qt.nbytes,
    }
    row.update(error_metrics(w32, w_hat))
    p = qt.params
    s, b = (p.scales, p.biases) if p is not None else (qt.scales, qt.biases)
    row["clipped_frac"] = clipped_fraction(w32, s, b, qt.bits, qt.group_size)
    if x is not None:
        row["out_rel_err"] = output_error(w32, w_hat, x)
    if act_sq is not None:
        row["act_rel_err"] = act_weighted_error(w32, w_hat, act_sq)
    if histograms:
        row["weight_hist"] = histogram(np.array(w32), weight_bins)
        row["error_hist"] = histogram(np.array(w_hat - w32), error_bins)
    return row


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
    rows, quantized, done = [], [], 0
    for bi, blk in enumerate(blocks):
        names = [n for n in MATRIX_ORDER if n in blk] + [n for n in blk if n not in MATRIX_ORDER]
        qblk = {}
        for name in names:
            cancel.check()
            w = blk[name]
            a = act_sq[bi].get(name) if act_sq is not None and bi < len(act_sq) else None
            xs = (activations[bi].get(name)
                  if activations is not None and bi < len(activations) else None)
            wq = w.astype(input_dtype) if input_dtype is not None else w
            qt = Q.quantize(wq, bits, g, strategy, act_sq=a, keep_codes=True, **strategy_args)
            row = {"block": bi, "matrix": name}
            row.update(matrix_metrics(w, qt, x=xs, act_sq=a, histograms=histograms))
            rows.append(row)
            if keep_quantized:
                qblk[name] = qt
            else:
                qt.codes = None
            done += 1
            progress(done / total, f"block {bi} {name}")
        if keep_quantized:
            quantized.append(qblk)
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
