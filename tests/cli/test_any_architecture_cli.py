"""The five commands of the workflow — info, quant-report, eval, calibrate (fast preset, block 0)
and export — on qwen2, qwen3, gemma3_text and phi3, each as a tiny mlx-lm folder and as a GGUF
file written the way llama.cpp's converter and its Q4_K_M quantizer write one (mixed Q4_K / Q6_K /
Q5_0 / Q8_0 / F16 / F32 tensors, SentencePiece or byte-level BPE vocabularies).

The GGUF writer and vocabularies are those of tests/core/test_gguf_architectures.py (loaded here
as a module of helpers). The commands run in-process through ``dupstudio.cli.main``; each check
recomputes what the command printed or wrote independently: the model's shape from config.json,
quantization errors in float64 NumPy from the matrices, perplexity and KL from the logits, and the
exported folder through mlx-lm's own ``load``.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from dupstudio.cli import main

#: GGUF architecture -> mlx-lm model type (the folder is written with the model type)
ARCHS = {"qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text", "phi3": "phi3"}
CASES = [f"{arch}-{kind}" for arch in ARCHS for kind in ("folder", "gguf")]
WINDOWS, CTX = 2, 32
CAL = ["--preset", "fast", "--blocks", "0", "--seqs", "4", "--seq-len", "32", "--steps", "2",
       "--batch", "2"]


def _gguf_helpers():
    """tests/core/test_gguf_architectures.py as a module (its llama.cpp-style writer); skips
    when the gguf package (test extra) is missing."""
    pytest.importorskip("gguf")
    path = Path(__file__).resolve().parents[1] / "core" / "test_gguf_architectures.py"
    spec = importlib.util.spec_from_file_location("_gguf_architecture_helpers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Per case: the model argument (folder or .gguf) and its mlx-lm model type; the text. The
    module runs with a DUPSTUDIO_HOME of its own, so the GGUF files are converted by this code."""
    from dupstudio.core.testing import make_tiny_model, tiny_text

    ga = _gguf_helpers()
    base = tmp_path_factory.mktemp("any-arch")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DUPSTUDIO_HOME", str(base / "home"))
        for i, (arch, model_type) in enumerate(ARCHS.items()):
            src = make_tiny_model(base / model_type, model_type, seed=10 + i)
            if arch in ("qwen2", "qwen3"):
                vocab = ga.bpe_vocab()
            else:
                vocab_size = json.loads((src / "config.json").read_text())["vocab_size"]
                sp = ga.train_spm(arch == "phi3", gemma=arch == "gemma3")
                vocab = ga.spm_vocab(sp, pad_to=vocab_size if arch == "phi3" else 0,
                                     gemma=arch == "gemma3")
            path = base / f"{arch}-Q4_K_M.gguf"
            _, types = ga.write_like_llama_cpp(src, path, arch, vocab, np.random.default_rng(i))
            assert {"Q4_K", "Q8_0", "F16", "F32"} <= set(types.values())
            out[f"{arch}-folder"] = (src, model_type)
            out[f"{arch}-gguf"] = (path, model_type)
        text = base / "text.txt"
        text.write_text(tiny_text(20000), encoding="utf-8")
        yield {"cases": out, "text": text, "base": base}


@pytest.fixture(scope="module")
def loaded(files):
    """The models as dupstudio opens them in-process (the GGUFs converted in the same cache)."""
    from dupstudio.core.model_io import open_model

    return {case: open_model(path) for case, (path, _) in files["cases"].items()}


def _cli(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    return out


def _windows(lm, text):
    from dupstudio.core.evaluate import make_windows, tokenize

    return make_windows(tokenize(lm.tokenizer, Path(text).read_text(encoding="utf-8")), CTX, WINDOWS)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _scores(model, windows, reference=None):
    """Perplexity and mean KL(reference || model) per token, in float64 from the logits."""
    ids = mx.array(windows)
    logp = _log_softmax(np.array(model(ids[:, :-1]).astype(mx.float32)))
    targets = windows[:, 1:]
    nll = -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    ppl = float(np.exp(nll.mean()))
    if reference is None:
        return ppl, None
    rlogp = _log_softmax(np.array(reference(ids[:, :-1]).astype(mx.float32)))
    return ppl, float((np.exp(rlogp) * (rlogp - logp)).sum(-1).mean())


@pytest.fixture(scope="module")
def calibrated(files):
    """Per case, once: ``config new`` (2-bit, group 32) then ``calibrate`` (fast preset, block 0,
    4 sequences of 32 tokens, 2 steps); the written configuration's path."""
    done = {}

    def get(case):
        if case not in done:
            path, _ = files["cases"][case]
            d = files["base"] / f"run-{case}"
            d.mkdir()
            assert main(["config", "new", str(path), "--bits", "2", "--group", "32",
                         "--out", str(d / "cfg.json")]) == 0
            assert main(["calibrate", str(d / "cfg.json"), "--text", str(files["text"]), *CAL,
                         "--out", str(d / "cal.json")]) == 0
            done[case] = d / "cal.json"
        return done[case]

    return get


@pytest.mark.parametrize("case", CASES)
def test_info(files, loaded, capsys, case):
    path, model_type = files["cases"][case]
    cfg = loaded[case].config
    # (transformers' Phi3Config pads with id 32000 when config.json names none: outside this vocabulary)
    pad = cfg.get("pad_token_id", 32000 if model_type == "phi3" else None)
    assert pad is None or 0 <= pad < cfg["vocab_size"]
    d = json.loads(_cli(capsys, "info", path, "--json"))
    assert d["architecture"] == model_type and d["num_blocks"] == 3
    assert d["matrices_per_block"] == (4 if model_type == "phi3" else 7)
    assert d["hidden_size"] == (320 if model_type == "gemma3_text" else 256)
    assert len(d["blocks"]) == 3 and d["parameters"] > d["linear_parameters"] > 0
    assert d["tied_embeddings"] is (model_type not in ("qwen3", "phi3"))
    text = _cli(capsys, "info", path)
    assert model_type in text and "Traceback" not in text


@pytest.mark.parametrize("case", CASES)
def test_quant_report(files, loaded, capsys, case):
    """Every matrix of every block is reported, with the errors of its 2-bit group-32 min-max
    quantization (float16 scales and biases) recomputed in float64 from the model's weights."""
    from dupstudio.core import adapters
    from dupstudio.core import quant as Q
    from dupstudio.core.model_io import block_linears

    path, _ = files["cases"][case]
    rep = json.loads(_cli(capsys, "quant-report", path, "--bits", "2", "--group", "32",
                          "--json", "-"))
    lm = loaded[case]
    lin = block_linears(lm.model)
    names = adapters.of_model(lm.model).matrix_names
    assert [(r["block"], r["matrix"]) for r in rep["matrices"]] == [
        (b, m) for b in range(3) for m in names]
    sse_all = wsq_all = 0.0
    for r in rep["matrices"]:
        w = lin[r["block"]][r["matrix"]]
        qt = Q.quantize(w, 2, 32)
        w64 = np.array(w.astype(mx.float32)).astype(np.float64)
        e = np.array(qt.dequantize()).astype(np.float64) - w64
        sse, wsq = float((e * e).sum()), float((w64 * w64).sum())
        sse_all, wsq_all = sse_all + sse, wsq_all + wsq
        assert r["params"] == w.size and r["bits_per_weight"] == pytest.approx(3.0)
        assert r["mse"] == pytest.approx(sse / w.size, rel=1e-5)
        assert r["rel_fro"] == pytest.approx(np.sqrt(sse / wsq), rel=1e-5)
        assert r["max_abs"] == pytest.approx(float(np.abs(e).max()), rel=1e-6)
        # outside the group's grid [b, b + 3s] (ends ordered) by more than 1/1000 of a step
        s = np.array(qt.params.scales)[..., None].astype(np.float64)
        b = np.array(qt.params.biases)[..., None].astype(np.float64)
        lo, hi = np.minimum(b, b + 3 * s) - 1e-3 * np.abs(s), np.maximum(b, b + 3 * s) + 1e-3 * np.abs(s)
        wg = w64.reshape(s.shape[0], s.shape[1], 32)
        assert r["clipped_frac"] == pytest.approx(float(((wg < lo) | (wg > hi)).mean()), abs=1e-4)
    assert rep["total"]["rel_fro"] == pytest.approx(np.sqrt(sse_all / wsq_all), rel=1e-5)
    assert 0.05 < rep["total"]["rel_fro"] < 1.0


@pytest.mark.parametrize("case", CASES)
def test_eval_full_precision(files, loaded, capsys, case):
    path, _ = files["cases"][case]
    res = json.loads(_cli(capsys, "eval", "--model", path, "--text", files["text"], "--windows",
                          WINDOWS, "--ctx", CTX, "--batch", 2, "--json"))
    lm = loaded[case]
    ppl, _ = _scores(lm.model, _windows(lm, files["text"]))
    assert np.isfinite(res["ppl"]) and res["ppl"] > 1
    assert res["tokens"] == WINDOWS * (CTX - 1)
    assert res["ppl"] == pytest.approx(ppl, rel=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_calibrate_block_0(files, calibrated, case):
    """The fast preset restricted to block 0 writes a configuration whose block 0 carries an
    accepted calibration that lowered its loss, and no other block; the configuration names
    the model as given (the .gguf file, not the conversion cache)."""
    from dupstudio.core import config as C

    path, model_type = files["cases"][case]
    out = calibrated(case)
    raw = json.loads(out.read_text())
    assert raw["model"]["source"] == str(path)
    assert raw["model"]["architecture"] == model_type
    cfg = C.load(out)
    rec = cfg.blocks[0].calibration
    assert rec and rec["accepted"] and rec["loss_after"] < rec["loss_before"]
    assert not any(b.calibration for b in cfg.blocks[1:])
    assert raw["provenance"]["calibration"]


@pytest.mark.parametrize("case", CASES)
def test_eval_calibrated(files, loaded, calibrated, capsys, case):
    from dupstudio.core import config as C
    from dupstudio.core.model_io import model_shape
    from dupstudio.core.replicate import build

    out = calibrated(case)
    res = json.loads(_cli(capsys, "eval", out, "--text", files["text"], "--windows", WINDOWS,
                          "--ctx", CTX, "--batch", 2, "--json"))
    lm = loaded[case]
    cfg = C.load(out, model_shape(lm.config))
    ppl, kl = _scores(build(lm, cfg, "simulate"), _windows(lm, files["text"]), lm.model)
    assert np.isfinite(res["ppl"]) and res["ppl"] == pytest.approx(ppl, rel=1e-4)
    assert res["kl"] > 0 and res["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
    assert res["bits_per_weight"] < 4


@pytest.mark.parametrize("case", CASES)
def test_export_reloads_in_mlx_lm(files, loaded, calibrated, capsys, tmp_path, case):
    """The K = 1 export is a standard mlx-lm folder of the same model type: mlx-lm loads it and
    its logits are those of dupstudio's simulated model (float32 export: dequantized weights in
    float32 either way) and its tokenizer encodes as the model's."""
    from mlx_lm import load

    from dupstudio.core import config as C
    from dupstudio.core.model_io import model_shape
    from dupstudio.core.replicate import build

    _, model_type = files["cases"][case]
    out = calibrated(case)
    dest = tmp_path / "exp"
    text = _cli(capsys, "export", out, "--out", dest, "--dtype", "float32")
    assert f"architecture {model_type} (standard mlx-lm; no custom code)" in text
    assert f"path {dest}" in text
    assert json.loads((dest / "config.json").read_text())["model_type"] == model_type
    model, tok = load(str(dest))
    lm = loaded[case]
    cfg = C.load(out, model_shape(lm.config))
    ids = mx.array(np.random.default_rng(2).integers(0, 300, (2, 20)))
    theirs = np.array(model(ids))
    ours = np.array(build(lm, cfg, "simulate")(ids))
    assert np.abs(theirs).max() > 0.1
    assert np.abs(theirs - ours).max() <= 1e-4 * max(1.0, np.abs(ours).max())
    sample = "The quick brown fox: Paris, 2024."
    assert tok.encode(sample) == lm.tokenizer.encode(sample)
