"""Tests for dupstudio.core.quant: MLX bit-identity, packing, strategies on hand examples."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from dupstudio.core import quant as Q
from dupstudio.core.jobs import DupstudioError

BITS = Q.SUPPORTED_BITS
GROUPS = (32, 64, 128)


def raw(a: mx.array) -> np.ndarray:
    """Bit pattern of an array (16-bit floats as uint16 so that bfloat16 works too)."""
    if a.dtype in (mx.float16, mx.bfloat16):
        a = a.view(mx.uint16)
    return np.array(a)


def weights(shape=(48, 256), seed=0, dtype=mx.float32):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, shape).astype(np.float32)
    w[rng.random(shape) < 0.01] *= 8  # outliers
    return mx.array(w).astype(dtype)


def groups(values) -> mx.array:
    """A single group (1, 1, g) for calling strategy functions directly."""
    return mx.array(np.asarray(values, dtype=np.float32).reshape(1, 1, -1))


def sb(pair):
    s, b = pair
    return float(s.reshape(-1)[0].item()), float(b.reshape(-1)[0].item())


# ---------------------------------------------------------------------------- MLX identity


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
def test_minmax_bit_identical_to_mx_quantize(bits, group, dtype):
    w = weights(dtype=dtype, seed=bits * 1000 + group)
    ref = mx.quantize(w, group, bits)
    qt = Q.quantize(w, bits, group, scale_dtype=dtype)
    for mine, theirs in zip(qt.triple(), ref):
        assert mine.shape == theirs.shape and mine.dtype == theirs.dtype
        assert np.array_equal(raw(mine), raw(theirs))
    # float32 parameters equal mx.quantize's on float32 input
    p = Q.compute_params(w, bits, group)
    r32 = mx.quantize(w.astype(mx.float32), group, bits)
    assert np.array_equal(np.array(p.scales), np.array(r32[1]))
    assert np.array_equal(np.array(p.biases), np.array(r32[2]))
    # codes are mx.quantize's codes
    assert np.array_equal(np.array(Q.unpack_codes(ref[0], bits, w.shape[1])), np.array(qt.codes))


@pytest.mark.parametrize("case", ["zeros", "const", "negconst", "pm1", "halves", "positive"])
def test_minmax_identical_on_edge_cases(case):
    rng = np.random.default_rng(3)
    w = {
        "zeros": np.zeros((4, 64)),
        "const": np.full((4, 64), 0.3),
        "negconst": np.full((4, 64), -0.3),
        "pm1": np.tile([-1.0, 1.0], (4, 32)),  # |min| == |max|, exact ties
        "halves": rng.integers(-16, 16, (4, 64)) / 2.0,  # many round-half cases
        "positive": rng.uniform(0.1, 0.3, (4, 64)),  # range not containing 0
    }[case]
    w = mx.array(w.astype(np.float32))
    for bits in BITS:
        ref = mx.quantize(w, 32, bits)
        qt = Q.quantize(w, bits, 32, scale_dtype=mx.float32)
        assert all(np.array_equal(raw(a), raw(b)) for a, b in zip(qt.triple(), ref)), bits


def test_default_storage_is_float16():
    w = weights()
    qt = Q.quantize(w, 2, 64)
    ref = mx.quantize(w, 64, 2)
    assert qt.scales.dtype == mx.float16 and qt.biases.dtype == mx.float16
    assert np.array_equal(np.array(qt.weight), np.array(ref[0]))
    assert np.array_equal(raw(qt.scales), raw(ref[1].astype(mx.float16)))
    assert qt.bits_per_weight == pytest.approx(2.5)
    assert qt.shape == w.shape and qt.params.scales.dtype == mx.float32


# ---------------------------------------------------------------------------- runs natively


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS + ("channel",))
def test_quantized_matmul_matches_dequantize(bits, group):
    w = weights((40, 384), seed=bits)
    x = mx.array(np.random.default_rng(1).normal(size=(5, 384)).astype(np.float32))
    for strategy in ("minmax", "ksigma"):
        qt = Q.quantize(w, bits, group, strategy, scale_dtype=mx.float32)
        y = mx.quantized_matmul(x, qt.weight, qt.scales, qt.biases, transpose=True,
                                group_size=qt.group_size, bits=bits)
        ref = x @ qt.dequantize().T
        np.testing.assert_allclose(np.array(y), np.array(ref), rtol=1e-4, atol=1e-4)
    # float16 storage, through mlx.nn.QuantizedLinear
    qt = Q.quantize(w, bits, group)
    lin = qt.to_linear()
    assert isinstance(lin, nn.QuantizedLinear)
    np.testing.assert_allclose(np.array(lin(x)), np.array(x @ qt.dequantize().T),
                               rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(np.array(qt.matmul(x)), np.array(lin(x)), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- packing


def bitstream_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Independent reference: each row is one little-endian bit stream, code j at bit bits*j."""
    rows = []
    for row in codes:
        v = 0
        for j, c in enumerate(row.tolist()):
            v |= int(c) << (bits * j)
        nbytes = len(row) * bits // 8
        rows.append(np.frombuffer(v.to_bytes(nbytes, "little"), dtype="<u4"))
    return np.stack(rows)


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, (6, 128)).astype(np.uint8)
    packed = Q.pack_codes(mx.array(codes), bits)
    assert packed.dtype == mx.uint32 and packed.shape == (6, 128 * bits // 32)
    assert np.array_equal(np.array(packed), bitstream_pack(codes, bits))
    assert np.array_equal(np.array(Q.unpack_codes(packed, bits, 128)), codes)


def test_three_bit_packing_by_hand():
    # 8 codes per 3 bytes: 24-bit little-endian word, code k at bits 3k..3k+2
    codes = np.array([[1, 2, 3, 4, 5, 6, 7, 0] * 4], dtype=np.uint8)
    word24 = sum(c << (3 * k) for k, c in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    b = word24.to_bytes(3, "little") * 4  # 12 bytes = 3 words
    expected = np.frombuffer(b, dtype="<u4")
    packed = np.array(Q.pack_codes(mx.array(codes), 3))[0]
    assert np.array_equal(packed, expected)
    # and MLX agrees: quantize values that map exactly onto these codes
    w = mx.array(codes.astype(np.float32) - 3.0)  # min -3, max 4: s=-1, b=4 → codes 4-w
    ref = mx.quantize(w, 32, 3)
    assert np.array_equal(np.array(Q.unpack_codes(ref[0], 3, 32)), 4 - (codes.astype(int) - 3))


def test_two_bit_packing_by_hand():
    codes = np.array([[3, 0, 1, 2] + [0] * 12], dtype=np.uint8)
    assert int(np.array(Q.pack_codes(mx.array(codes), 2))[0, 0]) == 3 | 0 << 2 | 1 << 4 | 2 << 6


def test_from_codes_builds_runnable_triple():
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 4, (8, 64)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.1, (8, 2)).astype(np.float32)
    biases = rng.uniform(-0.2, 0.0, (8, 2)).astype(np.float32)
    qt = Q.from_codes(mx.array(codes), mx.array(scales), mx.array(biases), 2, 32,
                      scale_dtype=mx.float32)
    expected = (np.repeat(scales, 32, 1) * codes + np.repeat(biases, 32, 1)).astype(np.float32)
    np.testing.assert_allclose(np.array(qt.dequantize()), expected, rtol=1e-6)
    x = mx.array(rng.normal(size=(3, 64)).astype(np.float32))
    np.testing.assert_allclose(np.array(qt.matmul(x)), np.array(x) @ expected.T, rtol=1e-4,
                               atol=1e-5)
    # per-row broadcast
    qt2 = Q.from_codes(mx.array(codes), mx.array(scales[:, 0]), mx.array(biases[:, :1]), 2, 32)
    assert qt2.scales.shape == (8, 2) and qt2.scales.dtype == mx.float16
    with pytest.raises(DupstudioError, match="scales must have shape"):
        Q.from_codes(mx.array(codes), mx.array(scales[:, :1].T), mx.array(biases), 2, 32)


def test_quantize_and_dequantize_codes():
    w = mx.array([[0.0, 1.0, 2.0, 3.0, 10.0, -5.0] + [0.0] * 26])
    p = Q.QuantParams(mx.ones((1, 1)), mx.zeros((1, 1)), 2, 32)
    codes = Q.quantize_codes(w, p)
    assert codes.dtype == mx.uint8
    assert np.array(codes)[0, :6].tolist() == [0, 1, 2, 3, 3, 0]
    deq = Q.dequantize_codes(codes, mx.full((1, 1), 0.5), mx.full((1, 1), -1.0), 32)
    assert deq.dtype == mx.float32
    assert np.array(deq)[0, :6].tolist() == [-1.0, -0.5, 0.0, 0.5, 0.5, -1.0]


# ---------------------------------------------------------------------------- strategies by hand


def test_minmax_by_hand():
    g = groups([-1.0, 0.0, 0.5, 2.0])
    # n = 3, s = 3/3 = 1; |min| < |max| → s = -1, edge = 2, q0 = rint(2/-1) = -2 → s = 2/-2, b = 2
    assert sb(Q.minmax(g, 2)) == (-1.0, 2.0)
    assert sb(Q.minmax(g, 2, zero_exact=False)) == (1.0, -1.0)
    # |min| > |max|: edge = min, s positive; 3-bit: s = 0.5/7, q0 = rint(-0.4/s) = -6 → s = 0.4/6
    s, b = sb(Q.minmax(groups([-0.4, 0.1]), 3))
    assert b == pytest.approx(-0.4) and s == pytest.approx(0.4 / 6)


def test_minmax_codes_round_half_to_even():
    w = mx.array(np.array([[-1.0, 0.0, 0.5, 2.0] * 8], dtype=np.float32))
    qt = Q.quantize(w, 2, 32, scale_dtype=mx.float32)
    # codes = rint((w - 2) / -1) = rint(2 - w) → [3, 2, rint(1.5)=2, 0]
    assert np.array(qt.codes)[0, :4].tolist() == [3, 2, 2, 0]
    assert np.array(qt.dequantize())[0, :4].tolist() == [-1.0, 0.0, 0.0, 2.0]


def test_symmetric_by_hand():
    g = groups([-1.0, 0.5, 2.0, 0.0])  # max |w| = 2
    assert sb(Q.symmetric(g, 2)) == (2.0, -4.0)  # s = 2/(2-1), b = -s·2
    assert sb(Q.symmetric(g, 2, grid="full")) == (1.0, -2.0)  # s = 2/2
    s, b = sb(Q.symmetric(g, 2, grid="midrise"))
    assert s == pytest.approx(4 / 3) and b == pytest.approx(-2.0)
    s, b = sb(Q.symmetric(g, 4))  # s = 2/7, b = -8 s
    assert s == pytest.approx(2 / 7) and b == pytest.approx(-16 / 7)
    with pytest.raises(DupstudioError, match="grid"):
        Q.symmetric(g, 2, grid="nope")


def test_percentile_by_hand():
    vals = [3.0, 0.0, 4.0, 1.0, 2.0]
    s, b = sb(Q.percentile(groups(vals), 2, p=90, zero_exact=False))
    lo, hi = np.percentile(vals, 10), np.percentile(vals, 90)  # 0.4, 3.6
    assert (lo, hi) == pytest.approx((0.4, 3.6))
    assert b == pytest.approx(lo) and s == pytest.approx((hi - lo) / 3)
    # p = 100 is min-max exactly
    g = groups(np.random.default_rng(0).normal(size=32))
    assert sb(Q.percentile(g, 3, p=100)) == sb(Q.minmax(g, 3))
    with pytest.raises(DupstudioError, match="p must be"):
        Q.percentile(g, 2, p=20)


def test_ksigma_by_hand():
    g = groups([-1.0, 1.0, -1.0, 1.0])  # mean 0, sigma 1
    s, b = sb(Q.ksigma(g, 2, k=0.5, zero_exact=False))
    assert b == pytest.approx(-0.5) and s == pytest.approx(1 / 3)
    s, b = sb(Q.ksigma(g, 2, k=3, zero_exact=False))  # clamped to [min, max]
    assert b == pytest.approx(-1.0) and s == pytest.approx(2 / 3)


def test_trimmed_by_hand():
    g = groups([5.0, 0.0, 9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0])
    s, b = sb(Q.trimmed(g, 2, trim=0.1, zero_exact=False))  # drop 1 each side: [1, 8]
    assert b == 1.0 and s == pytest.approx(7 / 3)
    s, b = sb(Q.trimmed(g, 2, trim=0.25, zero_exact=False))  # drop 2: [2, 7]
    assert b == 2.0 and s == pytest.approx(5 / 3)
    assert sb(Q.trimmed(g, 2, trim=0.0)) == sb(Q.minmax(g, 2))


def test_median_by_hand():
    s, b = sb(Q.median(groups([0.0, 1.0, 2.0, 10.0]), 2))
    # median 1.5, half-width max(8.5, 1.5) = 8.5 → s = 17/3, b = 1.5 - 8.5 = -7
    assert s == pytest.approx(17 / 3) and b == pytest.approx(-7.0)
    assert b + s * 1.5 == pytest.approx(1.5)  # grid centre at the median


def test_grid_offset_by_hand():
    g = groups([-1.0, 0.0, 0.5, 2.0])
    assert sb(Q.grid_offset(g, 2, f=0.5)) == (-1.0, 2.5)  # minmax s=-1, b=2; b += 0.5·|s|
    assert sb(Q.grid_offset(g, 2, f=0.0)) == sb(Q.minmax(g, 2))


def _np_fake_quant(w, lo, hi, bits):
    """Independent numpy version of the min-max rule + rounding (float64 is fine here)."""
    n = 2**bits - 1
    s = max((hi - lo) / n, 1e-7)
    mask = abs(lo) > abs(hi)
    s = s if mask else -s
    edge = lo if mask else hi
    q0 = np.rint(edge / s)
    b = 0.0
    if q0 != 0:
        s, b = edge / q0, edge
    return s * np.clip(np.rint((w - b) / s), 0, n) + b


def test_search_mse_picks_brute_force_best():
    rng = np.random.default_rng(7)
    w = rng.normal(0, 1, 32)
    w[3] = 6.0  # an outlier worth clipping
    ratios = np.linspace(0.5, 1.0, 11)
    errs = [np.sum((_np_fake_quant(w, r * w.min(), r * w.max(), 2) - w) ** 2) for r in ratios]
    r_best = ratios[int(np.argmin(errs))]
    assert r_best < 1.0
    got = sb(Q.search(groups(w), 2, ratios=ratios))
    want = sb(Q.minmax(groups(w * r_best), 2))
    assert got == pytest.approx(want, rel=1e-6)


def test_search_act_weighting_changes_the_choice():
    rng = np.random.default_rng(11)
    w = rng.normal(0, 1, (4, 64)).astype(np.float32)
    w[:, 0] = 6.0  # channel 0 carries an outlier in every row
    act = np.ones(64, np.float32)
    act[0] = 1000.0  # ... and the activations on channel 0 are huge
    wm = mx.array(w)
    p_mse = Q.compute_params(wm, 2, 64, "search")
    p_act = Q.compute_params(wm, 2, 64, "search", act_sq=mx.array(act), error="act")
    assert not np.allclose(np.array(p_mse.scales), np.array(p_act.scales))

    def errors(p):
        e = np.array(Q.dequantize_codes(Q.quantize_codes(wm, p), p.scales, p.biases, 64)) - w
        return float((e**2).sum()), float((act * e**2).sum())

    mse_m, act_m = errors(p_mse)
    mse_a, act_a = errors(p_act)
    assert mse_m < mse_a and act_a < act_m
    # activation weighting keeps the outlier: the act choice clips less (larger |scale|·n range)
    assert np.all(np.abs(np.array(p_act.scales)) >= np.abs(np.array(p_mse.scales)))


def test_search_act_needs_act_sq():
    with pytest.raises(DupstudioError, match="act_sq"):
        Q.compute_params(weights((4, 64)), 2, 64, "search", error="act")
    with pytest.raises(DupstudioError, match="one value per input channel"):
        Q.compute_params(weights((4, 64)), 2, 64, "search", error="act", act_sq=mx.ones(10))


@pytest.mark.parametrize("strategy", list(Q.STRATEGIES))
def test_every_strategy_runs_and_is_vectorised(strategy):
    w = weights((24, 256), seed=2)
    for group in (32, 128, "channel"):
        qt = Q.quantize(w, 3, group, strategy)
        assert qt.weight.shape == (24, 256 * 3 // 32)
        assert qt.scales.shape == (24, 256 // qt.group_size)
        err = float(mx.abs(qt.dequantize() - w).max().item())
        assert np.isfinite(err) and err < 1.0
    assert isinstance(Q.STRATEGIES[strategy].__doc__, str)


# ---------------------------------------------------------------------------- channel, groups


def test_channel_is_one_scale_per_row():
    w = weights((6, 576))
    p = Q.compute_params(w, 4, "channel")
    assert p.per_channel and p.group_size == 64 and p.scales.shape == (6, 9)
    s = np.array(p.scales)
    assert np.all(s == s[:, :1])
    ref = mx.quantize(w, 64, 4)  # not equal: a group is not a row
    one_group = Q.minmax(w.reshape(6, 1, 576), 4)
    assert np.array_equal(s[:, 0], np.array(one_group[0])[:, 0])
    assert not np.array_equal(np.array(ref[1]), s)


def test_valid_group_sizes():
    assert Q.valid_group_sizes(576) == [32, 64, "channel"]
    assert Q.valid_group_sizes(1536) == [32, 64, 128, "channel"]
    assert Q.valid_group_sizes(100) == []
    assert Q.parse_group_size("64") == 64 and Q.parse_group_size("Channel") == "channel"


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=5), "bits must be one of 2, 3, 4, 8"),
        (dict(group_size=48), "group size must be one of"),
        (dict(group_size=128), "does not divide the row width 576"),
        (dict(strategy="nope"), "unknown strategy 'nope'"),
        (dict(strategy="ksigma", p=3), "has no argument"),
        (dict(strategy="percentile", p=10), "p must be in"),
        (dict(strategy="trimmed", trim=0.7), "trim must be"),
        (dict(strategy="search", error="mae"), "error must be"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    args = dict(bits=2, group_size=64, strategy="minmax")
    args.update(kwargs)
    w = weights((4, 576))
    with pytest.raises(DupstudioError, match=match):
        Q.quantize(w, args.pop("bits"), args.pop("group_size"), args.pop("strategy"), **args)


def test_bad_matrix():
    with pytest.raises(DupstudioError, match="2-D"):
        Q.quantize(mx.zeros((64,)), 2, 32)
    with pytest.raises(DupstudioError, match="floating"):
        Q.quantize(mx.zeros((2, 64), dtype=mx.int32), 2, 32)
