"""Group-wise affine quantization in MLX's own packed layout.

Every weight row is cut into groups of ``group_size`` consecutive input channels; each group gets a
scale ``s`` and a bias ``b`` and each weight becomes an integer code ``q`` in ``[0, 2**bits - 1]`` with

    w  ≈  s · q + b

The output (:class:`QuantizedTensor`) holds exactly what :func:`mlx.core.quantize` returns
(``uint32`` packed codes, scales, biases, same shapes), so ``mx.quantized_matmul`` and
``mlx.nn.QuantizedLinear`` run it natively.

Everything is vectorised over whole matrices: a matrix ``(out, in)`` is viewed as
``(out, in/g, g)`` and all strategies work on that view (no Python loops over groups or rows).

MLX's min-max rule (``mlx/backend/cpu/quantized.cpp``, reproduced bit for bit by :func:`minmax`)::

    n     = 2**bits - 1
    s     = max((w_max - w_min) / n, 1e-7)
    if |w_min| > |w_max|:  edge = w_min             (scale positive)
    else:                  edge = w_max, s = -s     (scale NEGATIVE: codes count down from w_max)
    q0 = rint(edge / s)                             (round half to even)
    if q0 != 0:  s = edge / q0;  b = edge           (zero lands exactly on code -q0)
    else:        b = 0
    q  = clip(rint((w - b) / s), 0, n)              (codes use the float32 s, b)

so the larger-magnitude edge is exactly representable (code 0), zero is exactly representable, and
the far edge may fall up to half a step outside the grid. Scales and biases are computed in float32
and then stored as float16 (as deployed; bits per weight count them at 16 bits); codes are always computed from the float32 values,
as MLX does, so for float16 input the triple is identical to ``mx.quantize(w_fp16, g, bits)``.

Packing (all bit widths): MLX's packed rows are one little-endian bit stream, code ``j`` occupying
bits ``[bits·j, bits·(j+1))``. For 2/4/8 bits that is ``32/bits`` codes per ``uint32``, LSB first;
for 3 bits MLX writes 8 codes per 3 bytes (a 24-bit little-endian word), so a code may straddle two
``uint32`` words. The packed row has ``in·bits/32`` words.

"channel" (per output channel) quantization computes one scale/bias over the whole row and stores it
repeated over MLX groups of the largest supported size dividing the row, so it still runs in
``mx.quantized_matmul``.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from dupstudio.core.jobs import DupstudioError

SUPPORTED_BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128)
CHANNEL = "channel"
EPS = 1e-7  # MLX's minimum |scale|

GroupSize = Union[int, str]


# ----------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------


def valid_group_sizes(in_features: int) -> list:
    """Group sizes usable for a row of ``in_features``: the supported sizes that divide it, plus
    ``"channel"`` (which needs at least one of them for storage). 576 → ``[32, 64, "channel"]``."""
    sizes = [g for g in GROUP_SIZES if in_features % g == 0]
    return sizes + [CHANNEL] if sizes else []


def storage_group_size(in_features: int) -> int:
    """The MLX group size used to store a per-channel quantization: the largest supported size
    dividing the row."""
    for g in sorted(GROUP_SIZES, reverse=True):
        if in_features % g == 0:
            return g
    raise DupstudioError(
        f"row width {in_features} is not divisible by any supported group size {GROUP_SIZES}"
    )


def parse_group_size(group_size: GroupSize) -> GroupSize:
    """Normalise a group size given as int, numeric string or ``"channel"``."""
    if isinstance(group_size, str):
        g = group_size.strip().lower()
        if g in (CHANNEL, "per-channel", "row"):
            return CHANNEL
        try:
            group_size = int(g)
        except ValueError:
            raise DupstudioError(
                f"group size must be one of {', '.join(map(str, GROUP_SIZES))} or 'channel', "
                f"not {group_size!r}"
            ) from None
    if isinstance(group_size, (bool, float)) or group_size not in GROUP_SIZES:
        raise DupstudioError(
            f"group size must be one of {', '.join(map(str, GROUP_SIZES))} or 'channel', "
            f"not {group_size!r}"
        )
    return int(group_size)


def check_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise DupstudioError(
            f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, not {bits!r}"
        )
    return int(bits)


def _check_matrix(w: mx.array, group_size: GroupSize) -> tuple[int, int, int, bool]:
    """Validate ``w`` and ``group_size``; return (out, in, effective group, per_channel)."""
    if w.ndim != 2:
        raise DupstudioError(f"expected a 2-D weight matrix (out, in), got shape {tuple(w.shape)}")
    if not mx.issubdtype(w.dtype, mx.floating):
        raise DupstudioError(f"expected a floating-point weight matrix, got {w.dtype}")
    out_f, in_f = w.shape
    g = parse_group_size(group_size)
    if g == CHANNEL:
        storage_group_size(in_f)  # raises when impossible
        return out_f, in_f, in_f, True
    if in_f % g:
        ok = valid_group_sizes(in_f)
        raise DupstudioError(
            f"group size {g} does not divide the row width {in_f}; valid for this matrix: "
            f"{', '.join(map(str, ok)) or 'none'}"
        )
    return out_f, in_f, g, False


def _levels(bits: int) -> float:
    return float((1 << bits) - 1)


# ----------------------------------------------------------------------------------------------
# Range → (scale, bias)
# ----------------------------------------------------------------------------------------------


def affine_from_range(lo: mx.array, hi: mx.array, bits: int, zero_exact: bool = True):
    """Scale and bias whose grid spans ``[lo, hi]`` (per group arrays).

    ``zero_exact=True`` applies MLX's rule (module docstring): the larger-magnitude end is exactly
    representable and the grid is nudged so that 0 is a grid point; with ``lo=min, hi=max`` this is
    bit-identical to ``mx.quantize``. ``zero_exact=False``: plain ``s = (hi-lo)/n``, ``b = lo``.
    """
    n = _levels(bits)
    lo = lo.astype(mx.float32)
    hi = hi.astype(mx.float32)
    scale = mx.maximum((hi - lo) / n, EPS)
    if not zero_exact:
        return scale, lo
    mask = mx.abs(lo) > mx.abs(hi)
    scale = mx.where(mask, scale, -scale)
    edge = mx.where(mask, lo, hi)
    q0 = mx.round(edge / scale)  # mx.round rounds half to even, like std::rint
    nz = q0 != 0
    scale = mx.where(nz, edge / mx.where(nz, q0, 1.0), scale)
    bias = mx.where(nz, edge, 0.0)
    return scale, bias


def _fake_quant(wg: mx.array, scale: mx.array, bias: mx.array, bits: int) -> mx.array:
    """Quantize-dequantize groups ``(..., g)`` with per-group ``scale``/``bias`` ``(...)``."""
    s = scale[..., None]
    b = bias[..., None]
    q = mx.clip(mx.round((wg - b) / s), 0.0, _levels(bits))
    return s * q + b


def _order_stat(sorted_g: mx.array, pos: float) -> mx.array:
    """Linear interpolation at fractional index ``pos`` of sorted groups (numpy 'linear')."""
    g = sorted_g.shape[-1]
    pos = min(max(pos, 0.0), g - 1.0)
    i = int(math.floor(pos))
    frac = pos - i
    a = sorted_g[..., i]
    if frac == 0.0 or i + 1 >= g:
        return a
    return a + frac * (sorted_g[..., i + 1] - a)


# ----------------------------------------------------------------------------------------------
# Strategies. Each takes groups ``wg`` (out, n_groups, g) float32 and ``bits`` and returns
# (scale, bias), each (out, n_groups) float32. ``act_sq`` is (1, n_groups, g) or None.
# ----------------------------------------------------------------------------------------------


def minmax(wg: mx.array, bits: int, *, act_sq=None, zero_exact: bool = True):
    """Asymmetric min-max: the grid spans the group's [min, max].

    ``zero_exact=True`` (default) is MLX's rule and bit-identical to ``mx.quantize``;
    ``zero_exact=False`` is the textbook ``s = (max-min)/n, b = min``.
    """
    return affine_from_range(wg.min(-1), wg.max(-1), bits, zero_exact)


def symmetric(wg: mx.array, bits: int, *, act_sq=None, grid: str = "int"):
    """Symmetric around zero; the scale comes from the group's max |w| (``a``).

    ``grid="int"`` (default): signed-integer grid ``s·(q - 2^(b-1))``, ``s = a / (2^(b-1) - 1)``,
    ``b = -s·2^(b-1)``: zero exact, ±a exact, the most negative level unused by the data.
    ``grid="full"``: same grid with ``s = a / 2^(b-1)``: -a exact, +a clipped by one step.
    ``grid="midrise"``: exactly mirror-symmetric ``s = 2a/n``, ``b = -a`` (zero not on the grid).
    """
    a = mx.abs(wg).max(-1)
    half = float(1 << (bits - 1))
    if grid == "int":
        scale = mx.maximum(a / (half - 1.0), EPS)
        return scale, -scale * half
    if grid == "full":
        scale = mx.maximum(a / half, EPS)
        return scale, -scale * half
    if grid == "midrise":
        scale = mx.maximum(2.0 * a / _levels(bits), EPS)
        return scale, -scale * (_levels(bits) / 2.0)
    raise DupstudioError(f"symmetric: grid must be 'int', 'full' or 'midrise', not {grid!r}")


def percentile(wg: mx.array, bits: int, *, act_sq=None, p: float = 99.9, zero_exact: bool = True):
    """Clip both tails per group at percentiles ``100-p`` and ``p`` (numpy 'linear' interpolation
    between order statistics), then the min-max rule on that range. ``p=100`` is min-max."""
    p = float(p)
    if not 50.0 < p <= 100.0:
        raise DupstudioError(f"percentile: p must be in (50, 100], not {p}")
    srt = mx.sort(wg, axis=-1)
    g = wg.shape[-1]
    lo = _order_stat(srt, (100.0 - p) / 100.0 * (g - 1))
    hi = _order_stat(srt, p / 100.0 * (g - 1))
    return affine_from_range(lo, hi, bits, zero_exact)


def ksigma(wg: mx.array, bits: int, *, act_sq=None, k: float = 3.0, zero_exact: bool = True):
    """Range ``mean ± k·σ`` per group (population σ), intersected with [min, max] so it never
    spans beyond the data; then the min-max rule on that range."""
    k = float(k)
    if not k > 0:
        raise DupstudioError(f"ksigma: k must be positive, not {k}")
    mean = wg.mean(-1)
    std = mx.sqrt(mx.maximum((wg * wg).mean(-1) - mean * mean, 0.0))
    lo = mx.maximum(mean - k * std, wg.min(-1))
    hi = mx.minimum(mean + k * std, wg.max(-1))
    return affine_from_range(lo, hi, bits, zero_exact)


def trimmed(wg: mx.array, bits: int, *, act_sq=None, trim: float = 0.05, zero_exact: bool = True):
    """Trimmed range: drop the ``m = floor(trim·g)`` smallest and largest weights of each group and
    use the extreme remaining ones (order statistics ``m`` and ``g-1-m``, no interpolation); then
    the min-max rule. ``trim=0`` is min-max."""
    trim = float(trim)
    if not 0.0 <= trim < 0.5:
        raise DupstudioError(f"trimmed: trim must be in [0, 0.5), not {trim}")
    g = wg.shape[-1]
    m = int(math.floor(trim * g))
    if m == 0:
        return affine_from_range(wg.min(-1), wg.max(-1), bits, zero_exact)
    srt = mx.sort(wg, axis=-1)
    return affine_from_range(srt[..., m], srt[..., g - 1 - m], bits, zero_exact)


def median(wg: mx.array, bits: int, *, act_sq=None):
    """Median-aligned zero point: the grid's centre ``b + s·n/2`` is the group median and the
    half-width ``max(max - med, med - min)`` covers both extremes (nothing clipped)."""
    srt = mx.sort(wg, axis=-1)
    med = _order_stat(srt, (wg.shape[-1] - 1) / 2.0)
    hw = mx.maximum(srt[..., -1] - med, med - srt[..., 0])
    scale = mx.maximum(2.0 * hw / _levels(bits), EPS)
    return scale, med - scale * (_levels(bits) / 2.0)


def grid_offset(wg: mx.array, bits: int, *, act_sq=None, f: float = 0.5, zero_exact: bool = True):
    """Min-max grid shifted up by ``f`` steps in value space: ``b += f·|s|`` (``f=0`` is min-max;
    ``f=0.5`` moves every level half a step, so zero is no longer representable)."""
    f = float(f)
    scale, bias = affine_from_range(wg.min(-1), wg.max(-1), bits, zero_exact)
    return scale, bias + f * mx.abs(scale)


def search(
    wg: mx.array,
    bits: int,
    *,
    act_sq=None,
    error: str = "mse",
    min_ratio: float = 0.5,
    steps: int = 20,
    ratios: Optional[Sequence[float]] = None,
    zero_exact: bool = True,
):
    """Per-group clipping search: for each candidate ratio ``r`` (default
    ``linspace(min_ratio, 1, steps)``) the range ``[r·min, r·max]`` is quantized with the min-max
    rule and each group keeps the ratio with the smallest error:

    * ``error="mse"``: plain weight error ``Σ (w - ŵ)²`` over the group;
    * ``error="act"``: activation-weighted ``Σ_j act_sq[j]·(w_j - ŵ_j)²`` where ``act_sq[j]`` is the
      mean square of calibration activations on input channel ``j`` (diagonal of XᵀX/n); this is
      the expected output error for uncorrelated inputs. Needs ``act_sq``.

    Ties go to the larger ratio (ratios are tried from 1 downwards). Note that weight-MSE-optimal
    clipping is not perplexity-optimal (at 2/3 bits it is worse than min-max on the default model).
    """
    if error not in ("mse", "act"):
        raise DupstudioError(f"search: error must be 'mse' or 'act', not {error!r}")
    if error == "act" and act_sq is None:
        raise DupstudioError(
            "search with error='act' needs act_sq: the mean square of calibration activations per "
            "input channel (shape (in_features,)); pass act_sq=... or use error='mse'"
        )
    if ratios is None:
        steps = int(steps)
        if steps < 1:
            raise DupstudioError(f"search: steps must be >= 1, not {steps}")
        if not 0.0 < float(min_ratio) <= 1.0:
            raise DupstudioError(f"search: min_ratio must be in (0, 1], not {min_ratio}")
        ratios = np.linspace(float(min_ratio), 1.0, steps)
    ratios = sorted({float(r) for r in ratios}, reverse=True)
    if not ratios or min(ratios) <= 0:
        raise DupstudioError("search: ratios must be positive")
    wmin, wmax = wg.min(-1), wg.max(-1)
    weight = act_sq if error == "act" else None
    best = None
    for r in ratios:
        s, b = affine_from_range(r * wmin, r * wmax, bits, zero_exact)
        d = _fake_quant(wg, s, b, bits) - wg
        d2 = d * d
        err = (d2 * weight).sum(-1) if weight is not None else d2.sum(-1)
        if best is None:
            best = (err, s, b)
        else:
            better = err < best[0]
            best = (
                mx.where(better, err, best[0]),
                mx.where(better, s, best[1]),
                mx.where(better, b, best[2]),
            )
        mx.eval(*best)  # keep the lazy graph small
    return best[1], best[2]


STRATEGIES: dict[str, Callable] = {
    "minmax": minmax,
    "symmetric": symmetric,
    "percentile": percentile,
    "ksigma": ksigma,
    "trimmed": trimmed,
    "median": median,
    "grid_offset": grid_offset,
    "search": search,
}


def strategy_params(strategy: str) -> dict:
    """The tunable parameters of a strategy and their defaults."""
    fn = _get_strategy(strategy)
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind == p.KEYWORD_ONLY and name != "act_sq"
    }


def _get_strategy(strategy: str) -> Callable:
    try:
        return STRATEGIES[strategy]
    except (KeyError, TypeError):
        raise DupstudioError(
            f"unknown strategy {strategy!r}; choose from: {', '.join(STRATEGIES)}"
        ) from None


# ----------------------------------------------------------------------------------------------
# Parameters, codes, packing
# ----------------------------------------------------------------------------------------------


@dataclass
class QuantParams:
    """Per-group parameters before packing: ``scales``/``biases`` (out, in/group_size) float32.
    For per-channel quantization ``group_size`` is the storage group size and the values repeat
    along each row (``per_channel=True``)."""

    scales: mx.array
    biases: mx.array
    bits: int
    group_size: int
    per_channel: bool = False


def compute_params(
    w: mx.array,
    bits: int,
    group_size: GroupSize,
    strategy: str = "minmax",
    *,
    act_sq: Optional[mx.array] = None,
    **strategy_args,
) -> QuantParams:
    """Per-group float32 scales and biases for ``w`` (out, in) with the named strategy.

    ``act_sq`` (in,) is the per-input-channel mean square of calibration activations (only the
    ``search`` strategy with ``error="act"`` uses it). Unknown strategies, bad bits/group sizes and
    unknown strategy arguments raise :class:`DupstudioError`.
    """
    bits = check_bits(bits)
    fn = _get_strategy(strategy)
    allowed = strategy_params(strategy)
    unknown = sorted(set(strategy_args) - set(allowed))
    if unknown:
        raise DupstudioError(
            f"strategy {strategy!r} has no argument(s) {', '.join(unknown)}; it accepts: "
            f"{', '.join(f'{k}={v!r}' for k, v in allowed.items()) or 'none'}"
        )
    out_f, in_f, g, per_channel = _check_matrix(w, group_size)
    wg = w.astype(mx.float32).reshape(out_f, in_f // g, g)
    a = None
    if act_sq is not None:
        a = mx.array(act_sq).astype(mx.float32).reshape(-1)
        if a.size != in_f:
            raise DupstudioError(
                f"act_sq must have one value per input channel ({in_f}), got {a.size}"
            )
        a = a.reshape(1, in_f // g, g)
    try:
        scale, bias = fn(wg, bits, act_sq=a, **strategy_args)
    except (TypeError, ValueError) as e:
        raise DupstudioError(f"strategy {strategy!r}: bad argument: {e}") from None
    scale = scale.astype(mx.float32)
    bias = bias.astype(mx.float32)
    if per_channel:
        sg = storage_group_size(in_f)
        scale = mx.repeat(scale, in_f // sg, axis=1)
        bias = mx.repeat(bias, in_f // sg, axis=1)
        g = sg
    mx.eval(scale, bias)
    return QuantParams(scale, bias, bits, g, per_channel)


def _group_view(x: mx.array, group_size: int) -> mx.array:
    out_f, in_f = x.shape
    return x.reshape(out_f, in_f // group_size, group_size)


def quantize_codes(w: mx.array, params: QuantParams) -> mx.array:
    """Integer codes ``clip(rint((w - b) / s), 0, 2^bits - 1)`` as uint8 (out, in)."""
    wg = _group_view(w.astype(mx.float32), params.group_size)
    s = params.scales.astype(mx.float32)[..., None]
    b = params.biases.astype(mx.float32)[..., None]
    q = mx.clip(mx.round((wg - b) / s), 0.0, _levels(params.bits))
    return q.astype(mx.uint8).reshape(w.shape)


def dequantize_codes(
    codes: mx.array, scales: mx.array, biases: mx.array, group_size: int
) -> mx.array:
    """``s·q + b`` in float32, (out, in)."""
    qg = _group_view(codes, group_size).astype(mx.float32)
    s = scales.astype(mx.float32)[..., None]
    b = biases.astype(mx.float32)[..., None]
    return (s * qg + b).reshape(codes.shape)


def pack_codes(codes: mx.array, bits: int) -> mx.array:
    """Codes (out, in) → MLX's packed uint32 (out, in·bits/32). See the module docstring."""
    bits = check_bits(bits)
    out_f, in_f = codes.shape
    c = codes.astype(mx.uint32)
    if bits == 3:
        if in_f % 32:
            raise DupstudioError(f"3-bit packing needs a row width divisible by 32, got {in_f}")
        c = c.reshape(out_f, in_f // 8, 8)
        word24 = (c << mx.arange(0, 24, 3, dtype=mx.uint32)).sum(-1)
        byts = (word24[..., None] >> mx.array([0, 8, 16], dtype=mx.uint32)) & 0xFF
        return byts.astype(mx.uint8).reshape(out_f, in_f * 3 // 8).view(mx.uint32)
    pf = 32 // bits
    if in_f % pf:
        raise DupstudioError(f"{bits}-bit packing needs a row width divisible by {pf}, got {in_f}")
    c = c.reshape(out_f, in_f // pf, pf)
    return (c << mx.arange(0, 32, bits, dtype=mx.uint32)).sum(-1).astype(mx.uint32)


def unpack_codes(packed: mx.array, bits: int, in_features: int) -> mx.array:
    """MLX's packed uint32 (out, in·bits/32) → uint8 codes (out, in)."""
    bits = check_bits(bits)
    out_f = packed.shape[0]
    if packed.shape[-1] * 32 != in_features * bits:
        raise DupstudioError(
            f"packed width {packed.shape[-1]} does not match {in_features} {bits}-bit codes"
        )
    if bits == 3:
        byts = packed.view(mx.uint8).reshape(out_f, in_features // 8, 3).astype(mx.uint32)
        word24 = byts[..., 0] | (byts[..., 1] << 8) | (byts[..., 2] << 16)
        c = (word24[..., None] >> mx.arange(0, 24, 3, dtype=mx.uint32)) & 0x7
        return c.astype(mx.uint8).reshape(out_f, in_features)
    mask = (1 << bits) - 1
    c = (packed[..., None] >> mx.arange(0, 32, bits, dtype=mx.uint32)) & mask
    return c.astype(mx.uint8).reshape(out_f, in_features)


# ----------------------------------------------------------------------------------------------
# Quantized tensors
# ----------------------------------------------------------------------------------------------


@dataclass
class QuantizedTensor:
    """A quantized matrix in MLX's layout: ``weight`` uint32 (out, in·bits/32), ``scales`` and
    ``biases`` (out, in/group_size), float16 by default. ``codes`` (uint8, out×in) and the float32
    ``params`` are kept when available."""

    weight: mx.array
    scales: mx.array
    biases: mx.array
    bits: int
    group_size: int
    codes: Optional[mx.array] = None
    params: Optional[QuantParams] = field(default=None, repr=False)
    per_channel: bool = False
    strategy: Optional[str] = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.weight.shape[0], self.weight.shape[1] * 32 // self.bits)

    @property
    def n_params(self) -> int:
        o, i = self.shape
        return o * i

    @property
    def nbytes(self) -> int:
        """Bytes of codes + scales + biases as stored."""
        return int(self.weight.nbytes + self.scales.nbytes + self.biases.nbytes)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.n_params

    def get_codes(self) -> mx.array:
        if self.codes is None:
            self.codes = unpack_codes(self.weight, self.bits, self.shape[1])
        return self.codes

    def dequantize(self) -> mx.array:
        """The stored weights ``s·q + b`` (stored-precision scales/biases) in float32."""
        return dequantize_codes(self.get_codes(), self.scales, self.biases, self.group_size)

    def triple(self) -> tuple[mx.array, mx.array, mx.array]:
        """(weight, scales, biases) as ``mx.quantize`` returns them."""
        return self.weight, self.scales, self.biases

    def matmul(self, x: mx.array) -> mx.array:
        """``x @ Ŵᵀ`` through ``mx.quantized_matmul``."""
        return mx.quantized_matmul(
            x, self.weight, self.scales, self.biases,
            transpose=True, group_size=self.group_size, bits=self.bits,
        )

    def to_linear(self, bias: Optional[mx.array] = None):
        """An ``mlx.nn.QuantizedLinear`` running these weights."""
        import mlx.nn as nn

        o, i = self.shape
        layer = nn.QuantizedLinear(i, o, bias=bias is not None, group_size=self.group_size,
                                   bits=self.bits)
        layer.weight, layer.scales, layer.biases = self.weight, self.scales, self.biases
        if bias is not None:
            layer.bias = bias
        return layer


def from_codes(
    codes: mx.array,
    scales: mx.array,
    biases: mx.array,
    bits: int,
    group_size: int,
    *,
    scale_dtype=mx.float16,
) -> QuantizedTensor:
    """Pack fixed integer ``codes`` (out, in) with arbitrary per-group ``scales``/``biases``
    ((out, in/group_size); (out,) or (out, 1) broadcast along the row) into a QuantizedTensor."""
    bits = check_bits(bits)
    group_size = parse_group_size(group_size)
    if group_size == CHANNEL:
        raise DupstudioError("from_codes needs the storage group size (32, 64 or 128)")
    codes = mx.array(codes)
    if codes.ndim != 2 or codes.shape[1] % group_size:
        raise DupstudioError(
            f"codes must be (out, in) with in divisible by {group_size}, got {tuple(codes.shape)}"
        )
    out_f, in_f = codes.shape
    ng = in_f // group_size

    def _shape(a, name):
        a = mx.array(a).astype(mx.float32)
        if a.ndim == 1:
            a = a.reshape(-1, 1)
        if a.shape == (out_f, 1):
            a = mx.broadcast_to(a, (out_f, ng))
        if a.shape != (out_f, ng):
            raise DupstudioError(f"{name} must have shape {(out_f, ng)}, got {tuple(a.shape)}")
        return a

    s = _shape(scales, "scales")
    b = _shape(biases, "biases")
    c = codes.astype(mx.uint8)
    packed = pack_codes(c, bits)
    qt = QuantizedTensor(
        packed, s.astype(scale_dtype), b.astype(scale_dtype), bits, group_size, codes=c,
        params=QuantParams(s, b, bits, group_size),
    )
    mx.eval(qt.weight, qt.scales, qt.biases)
    return qt


def quantize(
    w: mx.array,
    bits: int,
    group_size: GroupSize,
    strategy: str = "minmax",
    *,
    act_sq: Optional[mx.array] = None,
    scale_dtype=mx.float16,
    keep_codes: bool = True,
    **strategy_args,
) -> QuantizedTensor:
    """Quantize ``w`` (out, in) with the named strategy into MLX's packed layout.

    Parameters are computed in float32, codes from the float32 parameters, then scales/biases are
    cast to ``scale_dtype`` (float16 by default; pass ``mx.float32`` to keep them, or the input
    dtype to reproduce ``mx.quantize`` for that dtype). With ``strategy="minmax"`` the triple is
    bit-identical to ``mx.quantize(w, group_size, bits)`` when ``scale_dtype`` equals ``w.dtype``.
    """
    params = compute_params(w, bits, group_size, strategy, act_sq=act_sq, **strategy_args)
    codes = quantize_codes(w, params)
    packed = pack_codes(codes, params.bits)
    qt = QuantizedTensor(
        packed,
        params.scales.astype(scale_dtype),
        params.biases.astype(scale_dtype),
        params.bits,
        params.group_size,
        codes=codes if keep_codes else None,
        params=params,
        per_channel=params.per_channel,
        strategy=strategy,
    )
    mx.eval(qt.weight, qt.scales, qt.biases, *([codes] if keep_codes else []))
    return qt


def fake_quantize(
    w: mx.array,
    bits: int,
    group_size: GroupSize,
    strategy: str = "minmax",
    *,
    act_sq: Optional[mx.array] = None,
    scale_dtype=mx.float16,
    **strategy_args,
) -> mx.array:
    """``quantize(...).dequantize()`` in float32 without packing."""
    params = compute_params(w, bits, group_size, strategy, act_sq=act_sq, **strategy_args)
    codes = quantize_codes(w, params)
    return dequantize_codes(codes, params.scales.astype(scale_dtype),
                            params.biases.astype(scale_dtype), params.group_size)


def bits_per_weight(bits: int, group_size: int) -> float:
    """Storage cost per weight with a float16 scale and float16 bias per group: bits + 32/g."""
    return bits + 32.0 / group_size
