"""Streamed (block-by-block) evaluation equals the in-memory one; memory estimates."""
import json

import numpy as np
import pytest

from dupstudio.core import config as C
from dupstudio.core.evaluate import evaluate, make_windows, tokenize
from dupstudio.core.model_io import model_shape
from dupstudio.core.replicate import build
from dupstudio.core.streaming import estimate_peak_memory, evaluate_streamed
from dupstudio.core.testing import tiny_text


@pytest.fixture(scope="module")
def windows(tiny_loaded):
    return make_windows(tokenize(tiny_loaded.tokenizer, tiny_text(12000)), 48, 5)


@pytest.fixture(scope="module")
def cfg(tiny_loaded):
    c = C.new_config(model_shape(tiny_loaded.config), replicas=2, layers=[0, 2], init="gamma")
    c.blocks[2].set_replicas(2, "parallel")
    c.blocks[0].gains = [1.0, 0.5]
    return c


def _same(a, b):
    """Two evaluations of the same model by different code (streamed against in memory): the
    logits come from matmuls of other shapes, which BLAS kernels may sum in another order, so
    they agree to float32 rounding, not bit for bit. A per-token NLL (~log V ≈ 6 nats) then
    moves by ~1e-7 relative and its means (window NLLs, log ppl) by less: rel 1e-6 leaves a
    10x margin. KL subtracts log-probs of that size to get ~0.1-1 nats, so its relative
    rounding is ~10x larger: rel 1e-5. A position whose two largest logits lie within rounding
    of each other may flip its top-1: one position. A real mistake (a wrong row, chunk or
    cast) moves every one of these by orders of magnitude more."""
    assert b.ppl == pytest.approx(a.ppl, rel=1e-6)
    assert np.allclose(a.window_nll, b.window_nll, rtol=1e-6)
    if a.kl is not None:
        assert b.kl == pytest.approx(a.kl, rel=1e-5, abs=1e-7)
        assert b.top1_agreement == pytest.approx(a.top1_agreement, abs=1 / a.tokens + 1e-12)


def _identical(a, b):
    """The same model evaluated by the same code on the same windows again: bit for bit."""
    assert (b.ppl, b.window_nll, b.kl, b.top1_agreement) == (a.ppl, a.window_nll, a.kl,
                                                             a.top1_agreement)


@pytest.mark.parametrize("spill", [False, True])
def test_streamed_equals_in_memory_with_reference(tiny_loaded, tiny_model_dir, cfg, windows, spill):
    ref = evaluate(build(tiny_loaded, cfg, "simulate"), windows, reference=tiny_loaded.model,
                   batch_size=2)
    got = evaluate_streamed(tiny_model_dir, cfg, windows, reference=True, batch_size=2, spill=spill)
    _same(ref, got)


def test_streamed_full_precision_equals_in_memory(tiny_loaded, tiny_model_dir, windows):
    _same(evaluate(tiny_loaded.model, windows), evaluate_streamed(tiny_model_dir, None, windows))


def test_streaming_an_open_model_leaves_it_usable(tiny_loaded, windows):
    before = evaluate(tiny_loaded.model, windows)
    evaluate_streamed(tiny_loaded, None, windows)
    _identical(before, evaluate(tiny_loaded.model, windows))


@pytest.mark.parametrize("tied", [True, False])
def test_streamed_head_in_chunks_matches_in_memory(tmp_path, monkeypatch, tied):
    """The embed step gathers rows and the head scores rows and vocabulary chunks read from the
    files: the in-memory model's whole-batch results to float32 rounding. (Not bit for bit: a
    chunk's matmul is another GEMM shape, and some BLAS kernels, e.g. OpenBLAS's Haswell and
    Zen ones, then sum its dot products in another order.)"""
    from dupstudio.core import streaming as S
    from dupstudio.core.model_io import open_model
    from dupstudio.core.testing import make_tiny_llama

    d = make_tiny_llama(tmp_path / "m", hidden=512, layers=2, tied=tied)
    loaded = open_model(d)
    w = make_windows(tokenize(loaded.tokenizer, tiny_text(12000)), 48, 5)
    shape = model_shape(loaded.config)
    monkeypatch.setattr(S, "VOCAB_CHUNK", 128)
    monkeypatch.setattr(S, "LOGIT_CHUNK_BYTES", 47 * 4 * shape["vocab_size"])
    monkeypatch.setattr(S, "_MIN_GEMM", 1 << 21)
    rows, vocab = S._head_chunks(2 * 47, shape["vocab_size"], shape["hidden_size"])
    assert len(rows) > 1 and len(vocab) > 1
    c = C.new_config(shape, replicas=2, layers=[0], init="gamma")
    cq = c.copy()
    cq.embedding.bits, cq.embedding.group_size = 4, 64
    for cfg in (None, c, cq):
        ref = cfg is not None
        a = evaluate(loaded.model if cfg is None else build(loaded, cfg, "simulate"), w,
                     reference=loaded.model if ref else None, batch_size=2)
        b = evaluate_streamed(d, cfg, w, reference=ref, batch_size=2)
        _same(a, b)
        assert (b.kl is not None) is ref


def test_head_chunks_cover_and_stay_large():
    from dupstudio.core import streaming as S

    for rows, vocab, hidden in [(508, 49152, 2048), (94, 384, 256), (20000, 151936, 896),
                                (1, 49152, 64), (3, 100, 8)]:
        rr, vr = S._head_chunks(rows, vocab, hidden)
        for ranges, n in ((rr, rows), (vr, vocab)):
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        if len(rr) > 1 or len(vr) > 1:
            assert min(b - a for a, b in rr) * min(b - a for a, b in vr) * hidden >= S._MIN_GEMM
            assert min(b - a for a, b in vr) >= 64


def test_estimates_streamed_below_in_memory_for_a_large_model(cfg):
    big = {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 24,
           "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 32,
           "vocab_size": 49152, "tie_word_embeddings": True}
    e = estimate_peak_memory(big, None, 40, 512, 64, 512, dtype_bytes=4)
    assert e["streamed_bytes"] < e["in_memory_bytes"] / 2
    assert e["base_weight_bytes"] > 6e9  # 1.7B parameters in float32
    more = estimate_peak_memory(big, None, 80, 512, dtype_bytes=4)
    assert more["eval_streamed_bytes"] > estimate_peak_memory(big, None, 40, 512, dtype_bytes=4)["eval_streamed_bytes"]


def test_cli_stream_and_no_stream_agree(tiny_model_dir, cfg, tmp_path, capsys):
    from dupstudio.cli import main

    c = cfg.copy()
    c.model.source = str(tiny_model_dir)
    C.save(c, tmp_path / "cfg.json")
    (tmp_path / "t.txt").write_text(tiny_text(12000))
    res = {}
    for flag in ("--stream", "--no-stream"):
        code = main(["eval", str(tmp_path / "cfg.json"), "--text", str(tmp_path / "t.txt"),
                     "--windows", "4", "--ctx", "48", "--json", flag])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "memory estimate: in memory" in err
        res[flag] = json.loads(out)
    assert res["--stream"]["provenance"]["streamed"] is True
    assert res["--stream"]["ppl"] == pytest.approx(res["--no-stream"]["ppl"], rel=1e-6)
    assert res["--stream"]["kl"] == pytest.approx(res["--no-stream"]["kl"], rel=1e-5)


def test_synthetic_model_is_sharded_and_streams(tmp_path):
    from dupstudio.core.model_io import open_model
    from dupstudio.core.synthetic import write_synthetic_llama

    p = write_synthetic_llama(tmp_path / "syn", 3e6, tokenizer_from=None, dtype="float32",
                              shard_bytes=1 << 20)
    assert len(list(p.glob("model-*-of-*.safetensors"))) > 1
    loaded = open_model(p)
    n = sum(a.size for _, a in __import__("mlx.utils", fromlist=["tree_flatten"]).tree_flatten(
        loaded.model.parameters()))
    assert 2e6 < n < 4.5e6
    w = make_windows(tokenize(loaded.tokenizer, tiny_text(4000)), 32, 2)
    _same(evaluate(loaded.model, w), evaluate_streamed(p, None, w))


# --------------------------------------------------------------------------- calibration
def _cal_settings(**kw):
    from dupstudio.core.calibrate import settings_from

    base = dict(steps=4, seqs=6, seq_len=32, batch=4)
    base.update(kw)
    return settings_from("fast", **base)


@pytest.fixture(scope="module")
def cal_tokens(tiny_loaded):
    return make_windows(tokenize(tiny_loaded.tokenizer, tiny_text(20000)), 32, 6)


def _assert_same_calibration(a, b):
    """Every tensor bit-identical, the same gains, β and per-block losses."""
    assert sorted(a.tensors) == sorted(b.tensors)
    assert len(a.tensors) > 0
    for key in a.tensors:
        x, y = np.array(a.tensors[key]), np.array(b.tensors[key])
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert np.array_equal(x, y), key
    for ba, bb in zip(a.blocks, b.blocks):
        assert ba.gains == bb.gains and ba.residual_gain == bb.residual_gain
        if ba.calibration is None:
            assert bb.calibration is None
            continue
        for f in ("loss_before", "loss_after", "accepted", "steps", "method"):
            assert ba.calibration[f] == bb.calibration[f], (ba.index, f)
    ca = [r["curve"] for r in a.provenance["calibration"]["blocks"]]
    cb = [r["curve"] for r in b.provenance["calibration"]["blocks"]]
    assert ca == cb


@pytest.mark.parametrize("spill", [False, True])
@pytest.mark.parametrize("case", ["k2-serial-adam", "k2-parallel-stats", "k1-gains-noinc"])
def test_streamed_calibration_equals_in_memory(tiny_loaded, tiny_model_dir, cal_tokens, windows,
                                               case, spill, tmp_path):
    from dupstudio.core.calibrate import calibrate
    from dupstudio.core.model_io import open_model
    from dupstudio.core.streaming import calibrate_streamed

    shape = model_shape(tiny_loaded.config)
    if case == "k2-serial-adam":
        cfg, s = C.new_config(shape, replicas=2, mode="serial", layers=[0, 2]), _cal_settings()
    elif case == "k2-parallel-stats":
        cfg, s = C.new_config(shape, replicas=2, mode="parallel"), _cal_settings(method="stats")
    else:
        cfg = C.new_config(shape)
        s = _cal_settings(gains=True, residual_gain=True, incremental=False, init="rtn")
    ref = calibrate(tiny_loaded, cfg, cal_tokens, s)
    # spilled: activations memory-mapped and finished blocks read back from the checkpoint
    got = calibrate_streamed(tiny_model_dir, cfg, cal_tokens, s, spill=spill,
                             checkpoint_dir=tmp_path / "ck" if spill else None)
    assert got.provenance["calibration"]["streamed"] is True
    _assert_same_calibration(ref, got)
    # and so the same perplexity
    e_ref = evaluate(build(tiny_loaded, ref, "simulate"), windows)
    e_got = evaluate(build(open_model(tiny_model_dir), got, "simulate"), windows)
    assert e_got.ppl == e_ref.ppl
    assert e_got.window_nll == e_ref.window_nll


def test_streamed_calibration_of_some_blocks_and_an_open_model(tiny_loaded, tiny_model_dir,
                                                               cal_tokens, windows):
    """``calibrate(..., stream=True)`` on an already opened model, blocks [1] only: identical,
    and the model (its weights released back to lazy file reads) still evaluates the same."""
    from dupstudio.core.calibrate import calibrate
    from dupstudio.core.model_io import open_model

    shape = model_shape(tiny_loaded.config)
    cfg = C.new_config(shape, replicas=2, mode="serial")
    s = _cal_settings()
    before = evaluate(tiny_loaded.model, windows)
    ref = calibrate(tiny_loaded, cfg, cal_tokens, s, blocks=[1])
    mine = open_model(tiny_model_dir)
    got = calibrate(mine, cfg, cal_tokens, s, blocks=[1], stream=True)
    _assert_same_calibration(ref, got)
    assert got.blocks[0].calibration is None and got.blocks[2].calibration is None
    _same(before, evaluate(mine.model, windows))


def test_streamed_calibration_resumes_from_checkpoint(tiny_loaded, tiny_model_dir, cal_tokens,
                                                      tmp_path):
    from dupstudio.core.calibrate import calibrate
    from dupstudio.core.jobs import CancelToken, Cancelled
    from dupstudio.core.streaming import calibrate_streamed

    shape = model_shape(tiny_loaded.config)
    s = _cal_settings()
    full = calibrate(tiny_loaded, C.new_config(shape), cal_tokens, s)
    tok = CancelToken()

    def stop_in_block_1(frac, msg):
        if msg.startswith("block 1: step"):
            tok.cancel()

    with pytest.raises(Cancelled):
        calibrate_streamed(tiny_model_dir, C.new_config(shape), cal_tokens, s,
                           checkpoint_dir=tmp_path, cancel=tok, progress=stop_in_block_1)
    assert (tmp_path / "block_000.json").exists() and not (tmp_path / "block_001.json").exists()
    resumed = calibrate_streamed(tiny_model_dir, C.new_config(shape), cal_tokens, s,
                                 checkpoint_dir=tmp_path)
    for key in full.tensors:
        assert np.array_equal(np.array(full.tensors[key]), np.array(resumed.tensors[key])), key
    assert not list((__import__("dupstudio.core.model_io", fromlist=["x"]).dupstudio_home()
                     / "tmp").glob("calib-acts-*"))


def test_pick_stream():
    from dupstudio.core.streaming import pick_stream

    assert pick_stream(10, available=9) is True
    assert pick_stream(10, available=10) is False
    assert pick_stream(10, available=4, resident=6) is False  # the app already holds 6
    assert pick_stream(10, available=1, override=False) is False
    assert pick_stream(1, available=10, override=True) is True


def test_calibration_estimate_counts_its_parts(tiny_loaded):
    from dupstudio.core.calibrate import settings_from
    from dupstudio.core.streaming import estimate_calibration_memory

    conf = tiny_loaded.config  # hidden 256, MLP 512, 4 heads of 64, 2 KV heads, 3 blocks, tied
    V, H = conf["vocab_size"], 256
    lin = 2 * H * 256 + 2 * H * 128 + 3 * H * 512
    shape = model_shape(conf)
    s = settings_from("fast", seqs=8, seq_len=64, batch=4, init="rtn")
    e = estimate_calibration_memory(conf, C.new_config(shape), 8, 64, s, dtype_bytes=4)
    assert e["float_block_bytes"] == 4 * lin
    assert e["float_model_bytes"] == 4 * (3 * lin + V * H)
    assert e["embedding_bytes"] == 4 * V * H
    assert e["activation_bytes"] == 3 * 8 * 64 * H * 4
    assert e["quantized_bytes"] == 3 * (lin * 2 // 8 + 4 * lin // 64)  # codes + fp16 scale/bias
    assert e["in_memory_bytes"] == (e["float_model_bytes"] + e["quantized_bytes"]
                                    + e["block_work_bytes"] + e["activation_bytes"])
    assert e["streamed_bytes"] == e["quantized_bytes"] + max(
        e["embedding_bytes"] + 2 * 8 * 64 * H * 4, e["block_work_bytes"] + e["activation_bytes"])
    # the Adam phase at least holds float32 codes and every replica's dequantized weights
    assert e["block_work_bytes"] >= 4 * lin + 4 * lin
    # K = 2 with own group scales: more result and more work
    k2 = estimate_calibration_memory(conf, C.new_config(shape, replicas=2), 8, 64, s, dtype_bytes=4)
    assert k2["quantized_bytes"] == e["quantized_bytes"] + 3 * 4 * lin // 64
    assert k2["block_work_bytes"] > e["block_work_bytes"]
    # spilled activations: one copy fewer; a checkpoint folder: the result is not held
    sp = estimate_calibration_memory(conf, None, 8, 64, s, dtype_bytes=4, spill=True,
                                     checkpoint=True)
    assert sp["streamed_bytes"] == max(e["embedding_bytes"] + 2 * 8 * 64 * H * 4,
                                       e["block_work_bytes"] + 2 * 8 * 64 * H * 4)
    # the closed-form start's normal equations count for wide layers
    # (the 1.5B synthetic benchmark model's shape)
    wide = dict(conf, hidden_size=2048, intermediate_size=5440, num_attention_heads=32,
                num_key_value_heads=32, head_dim=64, num_hidden_layers=28, vocab_size=49152)
    rtn = estimate_calibration_memory(wide, None, 4, 128, s, dtype_bytes=4, checkpoint=True)
    cf = estimate_calibration_memory(wide, None, 4, 128, settings_from("fast", init="closed_form"),
                                     batch=4, dtype_bytes=4, checkpoint=True)
    assert cf["block_work_bytes"] > rtn["block_work_bytes"]
    fp16 = 2 * (28 * rtn["float_block_bytes"] + rtn["embedding_bytes"]) // 4
    assert rtn["in_memory_bytes"] > 2 * fp16  # float32 weights
    assert rtn["streamed_bytes"] + 0.3e9 < 0.4 * fp16  # measured: 0.97 GB for one such block


def test_streamed_evaluation_with_release_keeps_an_open_model_usable(tiny_model_dir, cfg, windows):
    from dupstudio.core import streaming as S
    from dupstudio.core.model_io import open_model
    from dupstudio.core.streaming import release_weights

    lazy = open_model(tiny_model_dir, lazy=True)
    ref = evaluate_streamed(lazy, cfg, windows, reference=True, release=True)
    # the weights went back to lazy file reads, not away: the model still evaluates the same
    assert not any(isinstance(layer, S._Released) for layer in lazy.model.model.layers)
    again = evaluate_streamed(lazy, cfg, windows, reference=True, release=True)
    _identical(ref, again)
    full = open_model(tiny_model_dir)
    _identical(evaluate(full.model, windows), evaluate(lazy.model, windows))
    assert release_weights(full, "model.layers.1") is True


def test_streamed_blocks_are_the_model_weights(tiny_loaded, tiny_model_dir):
    import mlx.core as mx

    from dupstudio.core.model_io import block_linears, open_model
    from dupstudio.core.streaming import StreamedBlocks

    lazy = open_model(tiny_model_dir, lazy=True)
    sb = StreamedBlocks(lazy)
    assert len(sb) == 3
    ref = block_linears(tiny_loaded.model)
    for k, blk in enumerate(sb):
        assert sorted(blk) == sorted(ref[k])
        for m in blk:
            assert mx.array_equal(blk[m], ref[k][m]).item(), (k, m)
    with pytest.raises(IndexError):
        sb[3]
