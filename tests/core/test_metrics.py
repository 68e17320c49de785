"""Tests for dupstudio.core.metrics and the quant-report command."""
from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from dupstudio.core import metrics as M
from dupstudio.core import quant as Q
from dupstudio.core.jobs import CancelToken, Cancelled, DupstudioError


def test_error_metrics_known_error():
    w = mx.ones((4, 64))
    w_hat = w + 0.1  # error 0.1 everywhere: ‖e‖²/‖w‖² = 0.01 → 20 dB
    m = M.error_metrics(w, w_hat)
    assert m["mse"] == pytest.approx(0.01, rel=1e-5)
    assert m["rel_fro"] == pytest.approx(0.1, rel=1e-5)
    assert m["sqnr_db"] == pytest.approx(20.0, rel=1e-5)
    assert m["max_abs"] == pytest.approx(0.1, rel=1e-5)
    exact = M.error_metrics(w, w)
    assert exact["mse"] == 0 and exact["sqnr_db"] == math.inf


def test_sqnr_of_mixed_error():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 32)).astype(np.float32)
    e = rng.normal(size=(8, 32)).astype(np.float32) * 0.05
    m = M.error_metrics(mx.array(w), mx.array(w + e))
    assert m["sqnr_db"] == pytest.approx(10 * np.log10((w**2).sum() / (e**2).sum()), rel=1e-4)
    assert m["max_abs"] == pytest.approx(np.abs(e).max(), rel=1e-4)


def test_clipped_fraction_by_hand():
    # one group of 32, s = 1, b = 0, 2 bits → representable [0, 3]
    w = np.zeros((1, 32), np.float32)
    w[0, :6] = [-1.0, 0.0, 1.5, 3.0, 3.5, 10.0]  # 3 outside: -1, 3.5, 10
    s, b = mx.ones((1, 1)), mx.zeros((1, 1))
    assert M.clipped_fraction(mx.array(w), s, b, 2, 32) == pytest.approx(3 / 32)
    # negative scale: s = -1, b = 3 → same range [0, 3]
    assert M.clipped_fraction(mx.array(w), -s, b + 3, 2, 32) == pytest.approx(3 / 32)


def test_minmax_without_zero_rule_clips_nothing():
    w = mx.array(np.random.default_rng(1).normal(size=(16, 128)).astype(np.float32))
    qt = Q.quantize(w, 2, 64, zero_exact=False)
    assert M.matrix_metrics(w, qt)["clipped_frac"] == 0.0


def test_histogram_fixed_bins():
    x = np.array([-0.6, -0.5, -0.1, 0.0, 0.05, 0.5, 0.7], np.float32)
    edges = np.linspace(-0.5, 0.5, 5)  # [-0.5,-0.25) [-0.25,0) [0,0.25) [0.25,0.5]
    h = M.histogram(x, edges)
    assert h["counts"].tolist() == [1, 1, 2, 1]
    assert (h["below"], h["above"]) == (1, 1)
    assert np.array_equal(h["edges"], edges)
    y = np.random.default_rng(2).normal(0, 0.2, 10000).astype(np.float32)
    assert np.array_equal(M.histogram(y, M.WEIGHT_BINS)["counts"],
                          np.histogram(y, bins=M.WEIGHT_BINS)[0])
    with pytest.raises(DupstudioError):
        M.histogram(x, [0.0, 0.0, 1.0])


def test_storage_accounting():
    assert M.effective_bits(2, 64) == 2.5
    assert M.effective_bits(3, 32) == 4.0
    assert M.storage_bytes(576, 576, 2, 64) == 576 * 576 // 4 + 4 * 576 * 9
    qt = Q.quantize(mx.zeros((576, 576)) + 0.1, 2, 64)
    assert qt.nbytes == M.storage_bytes(576, 576, 2, 64)
    assert Q.bits_per_weight(4, 128) == 4.25


def test_matrix_metrics_on_known_quantization():
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 4, (8, 64)).astype(np.uint8)
    s = np.full((8, 2), 0.5, np.float32)
    b = np.full((8, 2), -1.0, np.float32)
    qt = Q.from_codes(mx.array(codes), mx.array(s), mx.array(b), 2, 32)
    w_hat = 0.5 * codes.astype(np.float32) - 1.0
    e = rng.uniform(-0.2, 0.2, w_hat.shape).astype(np.float32)
    w = w_hat + e
    x = rng.normal(size=(16, 64)).astype(np.float32)
    m = M.matrix_metrics(mx.array(w), qt, x=mx.array(x), act_sq=mx.ones(64), histograms=True)
    assert m["params"] == 512 and m["shape"] == "8x64"
    assert m["bits_per_weight"] == pytest.approx(3.0)  # 2 + 32/32
    assert m["mse"] == pytest.approx(float((e**2).mean()), rel=1e-4)
    assert m["rel_fro"] == pytest.approx(float(np.linalg.norm(e) / np.linalg.norm(w)), rel=1e-4)
    assert m["max_abs"] == pytest.approx(float(np.abs(e).max()), rel=1e-4)
    y = x @ w.T
    assert m["out_rel_err"] == pytest.approx(
        float(np.linalg.norm(x @ w_hat.T - y) / np.linalg.norm(y)), rel=1e-4)
    assert m["act_rel_err"] == pytest.approx(m["rel_fro"], rel=1e-4)  # uniform act = rel_fro
    # range is [-1, 0.5]; weights beyond it by more than 1/1000 step are clipped
    clipped = ((w < -1.0 - 5e-4) | (w > 0.5 + 5e-4)).mean()
    assert m["clipped_frac"] == pytest.approx(float(clipped))
    assert m["weight_hist"]["counts"].sum() + m["weight_hist"]["below"] + \
        m["weight_hist"]["above"] == 512
    assert np.array_equal(m["error_hist"]["counts"], np.histogram(-e, bins=M.ERROR_BINS)[0])


# ----------------------------------------------------------------------------------------------
# The fast path (NumPy slices, exact bin counting, a worker thread) against the straightforward
# computation: histograms and counts exactly equal; sums of squares within 1e-5 relative of
# float64 sums (they are float32 dot products per slice of 65,536 values, added in float64).


def _edge_cases(edges) -> np.ndarray:
    """Every edge as float32, one float32 step either side, and the non-finite values."""
    e = np.asarray(edges).astype(np.float32)
    up, down = np.float32(np.inf), np.float32(-np.inf)
    return np.concatenate([e, np.nextafter(e, up), np.nextafter(e, down),
                           np.float32([0.0, -0.0, np.nan, np.inf, -np.inf, 3e38, -3e38, 1e-40])])


@pytest.mark.parametrize("edges", [
    M.WEIGHT_BINS, M.ERROR_BINS, np.linspace(-1.0, 3.0, 7), np.linspace(0.1, 0.7, 1000),
    np.linspace(-0.3, 0.3, 20001),                        # many narrow bins: searched, not mapped
    np.array([-2.0, -0.5, -0.49, 0.0, 1e-9, 0.3, 5.0]),  # uneven
    np.linspace(1000.0, 1000.001, 11),                    # bins a few float32 steps wide
], ids=["weight", "error", "coarse", "1000", "20001", "uneven", "narrow"])
def test_histogram_counts_exactly_as_numpy(edges):
    rng = np.random.default_rng(11)
    lo, hi = float(edges[0]), float(edges[-1])
    width = hi - lo
    x = np.concatenate([
        rng.normal((lo + hi) / 2, width / 4, 150_000).astype(np.float32),  # more than one slice
        rng.uniform(lo - width, hi + width, 20_000).astype(np.float32),
        np.repeat(_edge_cases(edges), 3),
    ])
    rng.shuffle(x)
    h = M.histogram(x, edges)
    want, _ = np.histogram(x, bins=np.asarray(edges, np.float64))
    assert np.array_equal(h["counts"], want)
    assert h["below"] == int(np.count_nonzero(x < edges[0]))
    assert h["above"] == x.size - h["below"] - int(want.sum())  # NaN counts as above
    assert h["counts"].dtype == np.int64


def _reference_metrics(w, qt, weight_bins=M.WEIGHT_BINS, error_bins=M.ERROR_BINS) -> dict:
    """The straightforward computation: the dequantized matrix and its error in MLX, sums of
    squares in float64, clipped_fraction(), np.histogram."""
    w32 = w.astype(mx.float32)
    w_hat = qt.dequantize()
    e = np.array(w_hat - w32).astype(np.float64)
    wn = np.array(w32).astype(np.float64)
    p = qt.params
    s, b = (p.scales, p.biases) if p is not None else (qt.scales, qt.biases)
    return {
        "_sse": float((e * e).sum()), "_wsq": float((wn * wn).sum()),
        "max_abs": float(np.abs(e).max()),
        "clipped_frac": M.clipped_fraction(w32, s, b, qt.bits, qt.group_size),
        "weight_hist": np.histogram(np.array(w32), bins=weight_bins)[0],
        "error_hist": np.histogram(np.array(w_hat - w32), bins=error_bins)[0],
    }


def _matrices():
    rng = np.random.default_rng(5)
    heavy = rng.standard_t(3, (384, 512)).astype(np.float32) * 0.03
    heavy[::7, ::11] *= 20  # outliers beyond the histogram's edges
    zeros = rng.normal(0, 0.05, (64, 256)).astype(np.float32)
    zeros[3, :128] = 0.0  # all-zero groups
    grid = np.round(rng.normal(0, 40, (96, 384))).astype(np.float32) / 200  # on the bin edges
    return {
        "normal": mx.array(rng.normal(0, 0.05, (320, 768)).astype(np.float32)),
        "heavy": mx.array(heavy),
        "zeros": mx.array(zeros),
        "grid": mx.array(grid),
        "float16": mx.array(rng.normal(0, 0.05, (128, 512)).astype(np.float16)),
        "bfloat16": mx.array(rng.normal(0, 0.05, (128, 512)).astype(np.float32)).astype(mx.bfloat16),
        "wide": mx.array(rng.normal(0, 0.05, (3, 65536 + 128)).astype(np.float32)),  # > 1 slice per row
    }


@pytest.mark.parametrize("setting", [
    (2, 64, "minmax", {}), (3, 32, "percentile", {"p": 99.0}), (4, 128, "symmetric", {}),
    (2, "channel", "minmax", {}), (8, 32, "grid_offset", {"f": 0.5}),
], ids=["2b-minmax", "3b-percentile", "4b-symmetric", "2b-channel", "8b-offset"])
def test_matrix_metrics_equal_the_straightforward_computation(setting):
    bits, g, strategy, sargs = setting
    for name, w in _matrices().items():
        qt = Q.quantize(w, bits, g, strategy, **sargs)
        got = M.matrix_metrics(w, qt, histograms=True)
        ref = _reference_metrics(w, qt)
        assert got["_sse"] == pytest.approx(ref["_sse"], rel=1e-5), name
        assert got["_wsq"] == pytest.approx(ref["_wsq"], rel=1e-5), name
        assert got["mse"] == pytest.approx(ref["_sse"] / w.size, rel=1e-5), name
        assert got["rel_fro"] == pytest.approx(math.sqrt(ref["_sse"] / ref["_wsq"]), rel=1e-5)
        assert got["sqnr_db"] == pytest.approx(10 * math.log10(ref["_wsq"] / ref["_sse"]), abs=1e-4)
        assert got["max_abs"] == ref["max_abs"], name  # float32 values, exactly
        assert got["clipped_frac"] == ref["clipped_frac"], name
        for key in ("weight_hist", "error_hist"):
            assert np.array_equal(got[key]["counts"], ref[key]), (name, key)
        # without histograms: the same numbers
        plain = M.matrix_metrics(w, qt)
        assert {k: plain[k] for k in ("_sse", "_wsq", "max_abs", "clipped_frac")} == \
            {k: got[k] for k in ("_sse", "_wsq", "max_abs", "clipped_frac")}


def test_error_metrics_propagate_nan_and_match_float64():
    rng = np.random.default_rng(9)
    w = rng.normal(0, 0.05, (300, 1000)).astype(np.float32)
    e = rng.normal(0, 0.01, w.shape).astype(np.float32)
    m = M.error_metrics(mx.array(w), mx.array(w + e))
    d = (w + e).astype(np.float64) - w
    assert m["_sse"] == pytest.approx(float((d * d).sum()), rel=1e-5)
    assert m["max_abs"] == float(np.abs((w + e) - w).max())
    bad = (w + e).copy()
    bad[7, 9] = np.nan
    m = M.error_metrics(mx.array(w), mx.array(bad))
    assert math.isnan(m["max_abs"]) and math.isnan(m["mse"])


def test_quant_report_rows_equal_matrix_metrics_in_order():
    """The worker thread changes nothing: each row is matrix_metrics of that matrix, in block and
    matrix order, progress reaches 1 once per matrix."""
    blocks = _tiny_blocks(3)
    seen = []
    rep = M.quant_report(blocks, 2, 64, histograms=True, progress=lambda f, m: seen.append(m))
    assert len(seen) == 21 and seen[0] == "block 0 q_proj" and seen[-1] == "block 2 down_proj"
    for row, (bi, name) in zip(rep.matrices, [(b, n) for b in range(3) for n in M.MATRIX_ORDER]):
        assert (row["block"], row["matrix"]) == (bi, name)
        want = M.matrix_metrics(blocks[bi][name], Q.quantize(blocks[bi][name], 2, 64),
                                histograms=True)
        for k, v in want.items():
            if k.endswith("_hist"):
                assert np.array_equal(row[k]["counts"], v["counts"])
            else:
                assert row[k] == v, k


def test_quant_report_lists_another_architecture_in_its_own_order():
    rng = np.random.default_rng(0)
    blk = {m: mx.array(rng.normal(0, 0.05, s).astype(np.float32)) for m, s in
           (("qkv_proj", (384, 128)), ("o_proj", (128, 128)), ("gate_up_proj", (512, 128)),
            ("down_proj", (128, 256)))}
    rep = M.quant_report([blk], 2, 64)
    assert [r["matrix"] for r in rep.matrices] == list(blk)


def test_block_aggregation_is_parameter_weighted():
    rows = [
        {"block": 0, "matrix": "a", "params": 100, "bytes": 25, "_sse": 1.0, "_wsq": 100.0,
         "max_abs": 0.5, "clipped_frac": 0.1, "mse": 0.01},
        {"block": 0, "matrix": "b", "params": 300, "bytes": 75, "_sse": 3.0, "_wsq": 100.0,
         "max_abs": 0.7, "clipped_frac": 0.0, "mse": 0.01},
        {"block": 1, "matrix": "a", "params": 100, "bytes": 25, "_sse": 0.0, "_wsq": 1.0,
         "max_abs": 0.0, "clipped_frac": 0.0, "mse": 0.0},
    ]
    b0, b1 = M.summarize_blocks(rows)
    assert b0["block"] == 0 and b0["params"] == 400 and b0["matrices"] == 2
    assert b0["mse"] == pytest.approx(4.0 / 400)
    assert b0["rel_fro"] == pytest.approx(math.sqrt(4.0 / 200.0))
    assert b0["sqnr_db"] == pytest.approx(10 * math.log10(200 / 4))
    assert b0["clipped_frac"] == pytest.approx(0.1 * 100 / 400)
    assert b0["max_abs"] == 0.7 and b0["bits_per_weight"] == 8 * 100 / 400
    assert b1["sqnr_db"] == math.inf
    assert M.summarize(rows)["params"] == 500


def _tiny_blocks(n=2, hidden=256, inter=512, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"q_proj": (hidden, hidden), "k_proj": (128, hidden), "v_proj": (128, hidden),
              "o_proj": (hidden, hidden), "gate_proj": (inter, hidden),
              "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    return [{k: mx.array(rng.normal(0, 0.05, s).astype(np.float32)) for k, s in shapes.items()}
            for _ in range(n)]


def test_quant_report_tables():
    blocks = _tiny_blocks()
    seen = []
    rep = M.quant_report(blocks, 3, 64, "percentile", {"p": 99.0},
                         progress=lambda f, m: seen.append(f))
    assert len(rep.matrices) == 14 and len(rep.blocks) == 2
    assert seen[-1] == pytest.approx(1.0)
    df = rep.matrices_frame()
    assert list(df.columns[:10]) == M.MATRIX_COLUMNS
    assert df["matrix"].tolist()[:7] == list(M.MATRIX_ORDER)
    assert (df["bits_per_weight"] == 3.5).all()
    d = rep.to_json_dict()
    assert set(d) >= {"matrices", "blocks", "settings"}
    assert d["settings"]["strategy_args"] == {"p": 99.0}
    assert not any(k.startswith("_") for k in d["matrices"][0])
    json.dumps(d, allow_nan=False)
    # the block rows equal an independent aggregation
    b0 = df[df.block == 0]
    sse = (b0.mse * b0.params).sum()
    assert rep.blocks[0]["mse"] == pytest.approx(sse / b0.params.sum())


def test_quant_report_checks_and_cancel():
    blocks = _tiny_blocks(1, hidden=192, inter=384)
    with pytest.raises(DupstudioError, match="does not divide every row width"):
        M.quant_report(blocks, 2, 128)
    with pytest.raises(DupstudioError, match="unknown strategy"):
        M.quant_report(blocks, 2, 64, "best")
    with pytest.raises(DupstudioError, match="bits must be"):
        M.quant_report(blocks, 6, 64)
    tok = CancelToken()
    tok.cancel()
    with pytest.raises(Cancelled):
        M.quant_report(blocks, 2, 64, cancel=tok)


def test_quant_report_channel_and_input_dtype():
    blocks = _tiny_blocks(1)
    rep = M.quant_report(blocks, 4, "channel", input_dtype=mx.float16)
    assert rep.settings["group_size"] == "channel"
    assert rep.matrices[0]["group_size"] == 128  # stored as 128-groups with repeated scales
    assert rep.total["bits_per_weight"] == pytest.approx(4.25)


# ---------------------------------------------------------------------------- the command


@pytest.fixture
def tiny_model(monkeypatch):
    """Make open_model() return a tiny random llama (hidden 256) without touching disk."""
    from types import SimpleNamespace

    from mlx_lm.models.llama import Model, ModelArgs

    from dupstudio.core import model_io

    args = ModelArgs(model_type="llama", hidden_size=256, num_hidden_layers=2,
                     intermediate_size=512, num_attention_heads=4, rms_norm_eps=1e-5,
                     vocab_size=64, num_key_value_heads=2)
    mx.random.seed(0)
    model = Model(args)
    mx.eval(model.parameters())
    monkeypatch.setattr(model_io, "open_model",
                        lambda source=None, **kw: SimpleNamespace(model=model, path="tiny"))
    return model


def test_command_json_csv_and_text(tiny_model, tmp_path, capsys):
    from dupstudio.cli import main

    out = tmp_path / "r.json"
    assert main(["quant-report", "--bits", "3", "--group", "32", "--strategy", "ksigma",
                 "--strategy-arg", "k=2.5", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert len(d["matrices"]) == 14 and len(d["blocks"]) == 2
    assert d["settings"]["strategy_args"] == {"k": 2.5} and d["settings"]["model"] == "tiny"
    row = d["matrices"][0]
    for col in M.MATRIX_COLUMNS:
        assert col in row
    assert row["shape"] == "256x256" and row["bits_per_weight"] == 4.0

    assert main(["quant-report", "--csv", "-"]) == 0
    csv = capsys.readouterr().out.splitlines()
    assert csv[0].startswith("level,block,matrix,shape,params,bits_per_weight,mse")
    assert len(csv) == 1 + 14 + 2 + 1

    assert main(["quant-report", "--group", "128"]) == 0
    text = capsys.readouterr().out
    assert "down_proj" in text and "total" in text


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--bits", "5"], "bits must be one of"),
        (["--group", "48"], "group size must be one of"),
        (["--strategy", "best"], "unknown strategy"),
        (["--strategy", "ksigma", "--strategy-arg", "p=3"], "has no argument"),
        (["--strategy-arg", "oops"], "K=V"),
        (["--strategy", "search", "--strategy-arg", "error=act"], "act_sq"),
    ],
)
def test_command_bad_arguments(tiny_model, capsys, argv, msg):
    from dupstudio.cli import main

    assert main(["quant-report", *argv]) == 2
    assert msg in capsys.readouterr().err


def test_command_group_not_dividing_rows(monkeypatch, capsys):
    from types import SimpleNamespace

    from dupstudio.cli import main
    from dupstudio.core import model_io

    blocks = _tiny_blocks(1, hidden=192, inter=384)
    monkeypatch.setattr(model_io, "open_model", lambda source=None, **kw: SimpleNamespace(
        model=None, path="fake"))
    monkeypatch.setattr(model_io, "block_linears", lambda model: blocks)
    assert main(["quant-report", "--group", "128"]) == 2
    assert "valid: 32, 64, channel" in capsys.readouterr().err
