"""Every supported architecture runs through mlx-lm's own model classes.

For each of llama, mistral, qwen2, qwen3, gemma3_text and phi3: a tiny random model built from
mlx-lm's ModelArgs and written as an mlx-lm folder (dupstudio.core.testing.make_tiny_model),
opened with open_model, then checked against mlx-lm itself: full-precision logits, K = 1
quantization, replicas, incremental decoding, calibration, the end-to-end stage, streaming and
export. The tiny Gemma 3 slides an 8-token window on every other layer, shorter than the inputs,
so windowed masks and rotating caches are exercised.
"""
import json
import subprocess
import sys
import textwrap

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from dupstudio.core import adapters
from dupstudio.core import config as C
from dupstudio.core.jobs import DupstudioError
from dupstudio.core.model_io import SUPPORTED_MODEL_TYPES, block_linears, describe, model_shape, open_model
from dupstudio.core.replicate import block_tensors, build
from dupstudio.core.testing import TINY_TYPES, make_tiny_model, tiny_text

TYPES = list(TINY_TYPES)
#: a llama whose config.json marks sliding-window layers (mlx-lm's llama then masks them)
SLIDING = {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
           "sliding_window": 8}
WITH_SLIDING = TYPES + ["llama-sliding"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("arch")
    out = {t: make_tiny_model(base / t, t) for t in TYPES}
    out["llama-sliding"] = make_tiny_model(base / "llama-sliding", "llama", extra=SLIDING)
    return out


@pytest.fixture(scope="module")
def loaded(dirs):
    return {t: open_model(d) for t, d in dirs.items()}


@pytest.fixture(scope="module")
def tokens():
    return mx.array(np.random.default_rng(3).integers(0, 300, (2, 24)))


@pytest.fixture(scope="module")
def cal_tokens():
    return np.random.default_rng(1).integers(0, 300, (8, 32))


def _settings(**kw):
    from dupstudio.core.calibrate import settings_from

    return settings_from("fast", **{"steps": 2, "seqs": 8, "seq_len": 32, "batch": 4, **kw})


@pytest.fixture(scope="module")
def calibrated(loaded, cal_tokens):
    """Per type: block 0 calibrated (2 Adam steps, row and column gains), K = 1."""
    from dupstudio.core.calibrate import calibrate

    out = {}
    for t, lm in loaded.items():
        cfg = C.new_config(model_shape(lm.config), bits=2, group_size=32)
        out[t] = calibrate(lm, cfg, cal_tokens, _settings(gains=True), blocks=[0])
    return out


def _mlx_lm_model(path):
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    model.eval()
    return model


def test_supported_types_are_the_architectures_table():
    assert set(SUPPORTED_MODEL_TYPES) == set(TYPES)
    for t in TYPES:
        assert t in adapters.for_model_type(t).model_types
    with pytest.raises(DupstudioError) as e:
        adapters.for_model_type("gemma3")
    for t in TYPES:
        assert t in str(e.value)


@pytest.mark.parametrize("t", TYPES)
def test_opens_with_its_matrix_list(loaded, t):
    lm = loaded[t]
    arch = adapters.of_model(lm.model)
    shape = model_shape(lm.config)
    assert shape["architecture"] == t and lm.config["model_type"] == t
    lin = block_linears(lm.model)
    assert len(lin) == 3 and tuple(lin[0]) == arch.matrix_names
    # the matrix shapes the architecture table predicts are the model's
    assert {m: tuple(w.shape) for m, w in lin[0].items()} == arch.dims(shape)
    assert shape["tied_embeddings"] == ("lm_head" not in lm.model)
    d = describe(lm)
    assert d["matrices_per_block"] == len(arch.matrices) == (4 if t == "phi3" else 7)
    json.dumps(d)


@pytest.mark.parametrize("t", WITH_SLIDING)
def test_full_precision_build_equals_mlx_lm(loaded, tokens, t):
    """dupstudio's model (DupModel: embedding with its scale, per-window masks, final norm, head)
    around the float blocks gives mlx-lm's own logits."""
    from dupstudio.core.search import hybrid_model

    lm = loaded[t]
    cfg = C.new_config(model_shape(lm.config), group_size=32)
    ours = np.array(hybrid_model(lm, cfg, [])(tokens))
    ref = np.array(lm.model(tokens))
    assert np.abs(ours - ref).max() <= 1e-5
    if t in ("gemma3_text", "llama-sliding"):  # block 0 slides a window shorter than the input
        assert not isinstance(adapters.of_model(lm.model).causal_mask(lm.model.args, 0, 24), str)


@pytest.mark.parametrize("t", WITH_SLIDING)
def test_k1_equals_mlx_lm_quantization(dirs, loaded, tokens, t):
    """K = 1 deploy (minmax) is mlx-lm's model quantized by nn.quantize (scales and biases held
    in float16, as dupstudio stores them), bit for bit; simulate is mlx-lm's model holding the
    dequantized weights."""
    lm = loaded[t]
    shape = model_shape(lm.config)
    cfg = C.new_config(shape, bits=2, group_size=32)
    arch = adapters.of_model(lm.model)
    ref = _mlx_lm_model(dirs[t])
    paths = {f"model.layers.{k}.{m.path}" for k in range(3) for m in arch.matrices}
    nn.quantize(ref, group_size=32, bits=2, class_predicate=lambda p, _: p in paths)
    for p in paths:
        mod = adapters.get_module(ref, p)
        mod.scales, mod.biases = mod.scales.astype(mx.float16), mod.biases.astype(mx.float16)
    assert np.array_equal(np.array(build(lm, cfg, "deploy")(tokens)), np.array(ref(tokens)))

    deq = _mlx_lm_model(dirs[t])
    from dupstudio.core import quant

    for k in range(3):
        bt = block_tensors(lm, cfg, k)
        for m in arch.matrices:
            adapters.get_module(deq.model.layers[k], m.path).weight = quant.dequantize_codes(
                bt.codes[m.name], bt.scales[0][m.name].astype(mx.float32),
                bt.biases[0][m.name].astype(mx.float32), bt.group_size)
    sim = np.array(build(lm, cfg, "simulate")(tokens))
    assert np.abs(sim - np.array(deq(tokens))).max() <= 1e-5


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("mode", ["serial", "parallel"])
def test_k2_replicas_run(loaded, tokens, t, mode):
    lm = loaded[t]
    shape = model_shape(lm.config)
    cfg = C.new_config(shape, bits=2, group_size=32, replicas=2, mode=mode, init="lsq")
    dep = np.array(build(lm, cfg, "deploy")(tokens))
    sim = np.array(build(lm, cfg, "simulate")(tokens))
    assert np.isfinite(dep).all()
    assert np.abs(sim - dep).max() < 1e-3 * max(1.0, np.abs(dep).max())
    if mode == "serial":  # α = 0: exactly the K = 1 model
        for b in cfg.blocks:
            b.gains = [1.0, 0.0]
        k1 = build(lm, C.new_config(shape, bits=2, group_size=32), "deploy")(tokens)
        assert np.array_equal(np.array(build(lm, cfg, "deploy")(tokens)), np.array(k1))


@pytest.mark.parametrize("t", WITH_SLIDING)
def test_incremental_decoding_matches_full_forward(loaded, tokens, t):
    """One cache per replica pass (rotating for Gemma's sliding layers): prefill 10 tokens, then
    one at a time, as mlx-lm's generate does."""
    lm = loaded[t]
    cfg = C.new_config(model_shape(lm.config), bits=2, group_size=32, replicas=2, mode="serial",
                       init="lsq")
    cfg.blocks[1].gains = [1.0, 0.5]
    model = build(lm, cfg, "deploy")
    x = tokens[:1]
    full = np.array(model(x))
    cache = model.make_cache()
    assert len(cache) == 6
    outs = [np.array(model(x[:, :10], cache=cache))]
    for i in range(10, x.shape[1]):
        outs.append(np.array(model(x[:, i:i + 1], cache=cache)))
    assert np.allclose(np.concatenate(outs, axis=1), full, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("t", TYPES)
def test_calibration_lowers_block0_loss_and_the_built_block_reproduces_it(loaded, calibrated,
                                                                          cal_tokens, t):
    """Two Adam steps with row and column gains lower block 0's loss; the model built from the
    written configuration (gains folded into scales, fused rows and norms: Gemma's 1 + w) has
    that loss, up to the float16 storage of the tensors."""
    from dupstudio.core.calibrate import block_forward, embed_inputs

    lm, out = loaded[t], calibrated[t]
    rec = out.blocks[0].calibration
    assert rec["accepted"] and rec["loss_after"] < rec["loss_before"]
    assert any(k.startswith("b0.r0.col.") for k in out.tensors)
    arch = adapters.of_model(lm.model)
    x = embed_inputs(lm, lm.model.model.embed_tokens, mx.array(cal_tokens))
    mask = arch.causal_mask(lm.model.args, 0, x.shape[1])
    y = block_forward(lm.model.model.layers[0], x, mask)
    blk = build(lm, out, "simulate").blocks[0]
    loss = float(mx.mean((blk(x, mask) - y) ** 2).item())
    assert loss == pytest.approx(rec["loss_after"], rel=2e-2)


@pytest.mark.parametrize("t", TYPES)
def test_end_to_end_stage_runs(loaded, t):
    from dupstudio.core.calibration.e2e import tune_end_to_end
    from dupstudio.core.evaluate import make_windows, tokenize

    lm = loaded[t]
    cal = make_windows(tokenize(lm.tokenizer, tiny_text(6000)), 24, 6)
    cfg = C.new_config(model_shape(lm.config), bits=2, group_size=32, replicas=2, mode="parallel")
    new, rec = tune_end_to_end(lm, cfg, cal, steps=2, lr=1e-3, batch=2, holdout=0.34)
    assert np.isfinite(rec.kl_before) and rec.kl_after <= rec.kl_before
    assert np.isfinite(np.array(build(lm, new, "simulate")(mx.array(cal[:1, :-1])))).all()


@pytest.mark.parametrize("t", TYPES)
def test_export_reloads_in_mlx_lm(loaded, calibrated, tokens, tmp_path, t):
    """A K = 1 configuration exports as a standard mlx-lm folder of the same model_type; mlx-lm
    loads it and gives dupstudio's deploy logits (float32 export: the same numbers)."""
    from mlx_lm.utils import load

    from dupstudio.core.export import export_model

    lm, cfg = loaded[t], calibrated[t]
    r = export_model(lm, cfg, tmp_path / "exp", dtype="float32")
    assert r["architecture"] == t and not r["trust_remote_code"]
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["model_type"] == t
    model, _ = load(str(tmp_path / "exp"))
    ours = np.array(build(lm, cfg, "deploy")(tokens))
    assert np.abs(np.array(model(tokens)) - ours).max() <= 1e-5


LOADER = textwrap.dedent(r'''
    import json, sys
    spec = json.load(open(sys.argv[1]))
    sys.path.extend(spec["site_packages"])  # run with -I -S: no .pth files, so no editable dupstudio
    import numpy as np
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache
    res = {}
    try:
        import dupstudio  # noqa: F401
        res["dupstudio_importable"] = True
    except ImportError:
        res["dupstudio_importable"] = False
    tokens = mx.array(np.load(spec["tokens"]))
    for name, d in spec["exports"].items():
        r = res[name] = {}
        model, _ = load(d["path"], trust_remote_code=True)
        logits = model(tokens)
        np.save(d["logits"], np.array(logits))
        cache = make_prompt_cache(model)
        outs = [model(tokens[:, :10], cache=cache)]
        for t in range(10, tokens.shape[1]):
            outs.append(model(tokens[:, t:t + 1], cache=cache))
        inc = np.array(mx.concatenate(outs, axis=1))
        r["incremental_max_err"] = float(np.abs(inc - np.array(logits)).max())
        r["caches"] = [type(c).__name__ for c in cache]
        paths = json.load(open(d["path"] + "/config.json"))["dupstudio"]["matrices"].values()
        def get(m, p):
            for part in p.split("."):
                m = getattr(m, part)
            return m
        r["shared"] = all(get(b.replicas[0], p).weight is get(rep, p).weight
                          for b in model.model.layers for rep in b.replicas for p in paths)
    json.dump(res, open(spec["out"], "w"))
''')


def _site_packages() -> list:
    """The folders holding mlx, mlx_lm and their dependencies, without the repository (the fresh
    interpreter runs with -I -S, so an editable install of dupstudio is not active there)."""
    import importlib.util
    from pathlib import Path

    dirs = []
    for mod in ("mlx.core", "mlx_lm", "numpy", "transformers"):
        d = str(Path(importlib.util.find_spec(mod).origin).parents[1])
        if d not in dirs:
            dirs.append(d)
    return dirs


REPLICATED = [t for t in TYPES if t not in ("llama", "mistral")] + ["llama-sliding"]


@pytest.fixture(scope="module")
def replicated_exports(dirs, loaded, cal_tokens, tokens, tmp_path_factory):
    """Per type: a calibrated configuration with serial and parallel replicas and a residual
    gain, exported (float32) through the generic model file, and what a fresh interpreter that
    can import only mlx and mlx-lm makes of it."""
    from dupstudio.core.calibrate import calibrate
    from dupstudio.core.export import MODEL_FILE_ANY, export_model

    root = tmp_path_factory.mktemp("replicated")
    lms = loaded
    spec = {"site_packages": _site_packages(), "tokens": str(root / "tokens.npy"),
            "out": str(root / "out.json"), "exports": {}}
    np.save(spec["tokens"], np.array(tokens))
    cases = {}
    for t in REPLICATED:
        lm = lms[t]
        cfg = C.new_config(model_shape(lm.config), bits=2, group_size=32, replicas=2, mode="serial")
        cfg.blocks[1].set_replicas(2, "parallel")
        cfg.blocks[2].set_replicas(1)
        cfg = calibrate(lm, cfg, cal_tokens, _settings(gains=True, residual_gain=True), blocks=[0, 1])
        cfg.blocks[2].residual_gain = 0.9
        r = export_model(lm, cfg, root / f"exp-{t}", dtype="float32")
        assert r["trust_remote_code"] and r["architecture"] == f"custom ({MODEL_FILE_ANY})"
        cases[t] = (np.array(build(lm, cfg, "deploy")(tokens)), r)
        spec["exports"][t] = {"path": str(root / f"exp-{t}"), "logits": str(root / f"{t}.npy")}
    (root / "spec.json").write_text(json.dumps(spec))
    (root / "loader.py").write_text(LOADER)
    p = subprocess.run([sys.executable, "-I", "-S", str(root / "loader.py"), str(root / "spec.json")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((root / "out.json").read_text())
    return {t: (cases[t], res[t], np.load(spec["exports"][t]["logits"])) for t in REPLICATED}, res


@pytest.mark.parametrize("t", REPLICATED)
def test_replicated_export_loads_with_the_generic_model_file(replicated_exports, t):
    """Replicated blocks of any architecture: mlx-lm loads the export (trust_remote_code) in an
    interpreter where dupstudio is not importable, gives dupstudio's deploy logits, decodes
    incrementally with one cache per pass (rotating for sliding-window blocks) and holds each
    block's codes once."""
    exports, res = replicated_exports
    assert res["dupstudio_importable"] is False
    (ours, summary), r, theirs = exports[t]
    assert np.abs(theirs - ours).max() <= 1e-5
    assert r["incremental_max_err"] < 2e-4
    assert r["shared"] is True
    assert len(r["caches"]) == 2 + 2 + 1
    if t in ("gemma3_text", "llama-sliding"):
        assert "RotatingKVCache" in r["caches"] and "KVCache" in r["caches"]
    assert summary["passes"] == 5


@pytest.mark.parametrize("t", ["qwen2", "gemma3_text", "phi3"])
def test_streamed_calibration_and_evaluation_equal_in_memory(dirs, loaded, cal_tokens, t):
    """Streaming reads each block's linears from the files (qwen2's biases, phi3's fused
    matrices, Gemma's windows and embedding scale): the same tensors and evaluation."""
    from dupstudio.core.calibrate import calibrate
    from dupstudio.core.evaluate import evaluate, make_windows, tokenize
    from dupstudio.core.streaming import calibrate_streamed, evaluate_streamed

    lm = loaded[t]
    cfg = C.new_config(model_shape(lm.config), bits=2, group_size=32, replicas=2, layers=[1])
    s = _settings(gains=True)
    ref = calibrate(lm, cfg, cal_tokens, s)
    got = calibrate_streamed(dirs[t], cfg, cal_tokens, s)
    assert sorted(ref.tensors) == sorted(got.tensors)
    for key in ref.tensors:
        assert np.array_equal(np.array(ref.tensors[key]), np.array(got.tensors[key])), key
    windows = make_windows(tokenize(lm.tokenizer, tiny_text(6000)), 24, 4)
    a = evaluate(build(lm, ref, "simulate"), windows, reference=lm.model, batch_size=2)
    b = evaluate_streamed(dirs[t], ref, windows, reference=True, batch_size=2)
    assert b.ppl == pytest.approx(a.ppl, rel=1e-5)
    assert b.kl == pytest.approx(a.kl, rel=1e-4, abs=1e-7)


def test_unsupported_model_type_is_refused_with_the_list(dirs, tmp_path):
    import shutil

    d = tmp_path / "gpt2"
    shutil.copytree(dirs["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DupstudioError, match="unsupported architecture 'gpt2'") as e:
        open_model(d)
    assert all(t in str(e.value) for t in SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("t", ["llama", "gemma3_text"])
def test_a_column_gain_folds_into_the_norm_as_the_norm_computes(loaded, t):
    """nn.RMSNorm multiplies by w, Gemma's RMSNorm by 1 + w: the folded weight scales the norm's
    output column by column either way."""
    lm = loaded[t]
    arch = adapters.of_model(lm.model)
    norm = lm.model.model.layers[0].input_layernorm
    x = mx.random.normal((3, norm.weight.shape[0]))
    c = 1.0 + 0.2 * mx.random.normal(norm.weight.shape)
    folded = adapters.clone(norm)
    folded.weight = arch.fold_norm(norm.weight, c)
    assert np.allclose(np.array(folded(x)), np.array(norm(x) * c), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t", TYPES)
def test_row_and_column_gains_fold_exactly(loaded, t):
    """A configuration's row gains (every matrix) and column gains (q/k/v input, o input per KV
    head group, gate/up input, down input) built into block 0 equal scaling the dequantized
    block's matrix rows and columns directly: the folds land on the right rows of fused
    matrices (phi3's v and up parts), on the right norm (Gemma's pre-feedforward one, as
    1 + w) and scale a linear's own bias with its rows (qwen2). Up to the float16 storage of
    the folded scales."""
    lm = loaded[t]
    shape = model_shape(lm.config)
    arch = adapters.of_model(lm.model)
    cfg0 = C.new_config(shape, bits=4, group_size=32)
    rng = np.random.default_rng(5)

    def gain(n):
        return mx.array(1.0 + 0.4 * rng.uniform(-1, 1, n)).astype(mx.float16)

    H, qd = shape["hidden_size"], shape["num_heads"] * shape["head_dim"]
    dims = arch.dims(shape)
    t1 = {f"b0.r0.{m}.row_gain": gain(o) for m, (o, _) in dims.items()}
    for grp in ("o", "down"):
        _, a, b = arch.fold_rows(grp, shape)
        t1[f"b0.r0.col.{grp}"] = gain(b - a)
    t1["b0.r0.col.attn"], t1["b0.r0.col.mlp"] = gain(H), gain(H)
    cfg1 = cfg0.copy()
    cfg1.tensors = t1
    plain = build(lm, cfg0, "simulate").blocks[0].replicas[0]
    folded = build(lm, cfg1, "simulate").blocks[0].replicas[0]

    ref = adapters.clone(plain)
    f32 = {k: v.astype(mx.float32) for k, v in t1.items()}
    hd, rep = shape["head_dim"], shape["num_heads"] // shape["num_kv_heads"]
    o_cols = f32["b0.r0.col.o"][mx.array([(j // hd // rep) * hd + j % hd for j in range(qd)])]
    for mat in arch.matrices:
        lin = adapters.get_module(ref, mat.path)
        w = lin.weight * f32[f"b0.r0.{mat.name}.row_gain"][:, None]
        col = {"attn": f32["b0.r0.col.attn"], "mlp": f32["b0.r0.col.mlp"], "o": o_cols,
               "down": f32["b0.r0.col.down"]}[mat.reads]
        lin.weight = w * col[None, :]
        if "bias" in lin:
            lin.bias = lin.bias * f32[f"b0.r0.{mat.name}.row_gain"]
    x = mx.random.normal((2, 12, H), key=mx.random.key(0))
    mask = arch.causal_mask(lm.model.args, 0, 12)
    y_plain, y_ref, y_folded = (np.array(b(x, mask, None)) for b in (plain, ref, folded))
    change = np.abs(y_ref - y_plain).max()
    assert change > 0.1
    assert np.abs(y_folded - y_ref).max() < 1e-2 * change


@pytest.mark.parametrize("t", ["phi3", "gemma3_text"])
def test_roofline_plans_of_an_mlx_lm_quantized_model(dirs, loaded, t):
    """The sweep's mlx-lm baselines are described in the roofline's (llama) terms: a fused
    matrix stands for its parts."""
    from dupstudio.core.search import mlx_lm_plans

    m = _mlx_lm_model(dirs[t])
    nn.quantize(m, group_size=32, bits=2, class_predicate=lambda p, mod: "layers" in p and
                isinstance(mod, nn.Linear))
    plans, embed, head = mlx_lm_plans(m, model_shape(loaded[t].config))
    assert [(p.bits, p.group_size, p.matrix_bits) for p in plans] == [(2, 32, None)] * 3
    assert embed.bits == 16 and (head is None) == (t == "gemma3_text")
