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
