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
    assert b.ppl == pytest.approx(a.ppl, rel=1e-6)
    assert np.allclose(a.window_nll, b.window_nll, rtol=1e-6)
    if a.kl is not None:
        assert b.kl == pytest.approx(a.kl, rel=1e-5, abs=1e-7)
        assert b.top1_agreement == pytest.approx(a.top1_agreement)


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
    _same(before, evaluate(tiny_loaded.model, windows))


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
