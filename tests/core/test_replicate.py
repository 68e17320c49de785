"""Replication builder invariants on the tiny model."""
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import llama

from dupstudio.core import config as C
from dupstudio.core.model_io import model_shape
from dupstudio.core.replicate import accounting, build, deploy_block_bytes


@pytest.fixture(scope="module")
def shape(tiny_loaded):
    return model_shape(tiny_loaded.config)


@pytest.fixture(scope="module")
def tokens():
    mx.random.seed(3)
    return mx.random.randint(0, 300, (2, 24))


def _cfg(shape, **kw):
    return C.new_config(shape, **kw)


def _plain_quantized(loaded, bits=2, group=64, duplicate=False):
    """mlx-lm's own llama, quantized with mx.quantize (scales/biases cast to fp16)."""
    args = loaded.model.args
    if duplicate:
        args = llama.ModelArgs.from_dict({**loaded.config, "num_hidden_layers": 2 * args.num_hidden_layers})
    m = llama.Model(args)
    src = dict(__import__("mlx.utils", fromlist=["tree_flatten"]).tree_flatten(loaded.model.parameters()))
    if duplicate:
        new = {}
        for k, v in src.items():
            if k.startswith("model.layers."):
                parts = k.split(".")
                i = int(parts[2])
                for j in (2 * i, 2 * i + 1):
                    new[".".join(parts[:2] + [str(j)] + parts[3:])] = v
            else:
                new[k] = v
        src = new
    from mlx.utils import tree_unflatten

    m.update(tree_unflatten(list(src.items())))
    nn.quantize(m, group_size=group, bits=bits,
                class_predicate=lambda p, mod: isinstance(mod, nn.Linear) and "layers" in p)
    for layer in m.model.layers:
        for mod in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                    layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            mod.scales = mod.scales.astype(mx.float16)
            mod.biases = mod.biases.astype(mx.float16)
    mx.eval(m.parameters())
    return m


def test_k1_minmax_deploy_equals_plain_mx_quantize_exactly(tiny_loaded, shape, tokens):
    cfg = _cfg(shape, bits=2, group_size=64)
    ours = build(tiny_loaded, cfg, "deploy")(tokens)
    ref = _plain_quantized(tiny_loaded)(tokens)
    assert np.array_equal(np.array(ours), np.array(ref))


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 32), (4, 128)])
def test_simulate_matches_deploy(tiny_loaded, shape, tokens, bits, group):
    cfg = _cfg(shape, bits=bits, group_size=group, replicas=2, mode="parallel")
    a = np.array(build(tiny_loaded, cfg, "simulate")(tokens))
    b = np.array(build(tiny_loaded, cfg, "deploy")(tokens))
    assert np.abs(a - b).max() < 1e-3 * max(1.0, np.abs(b).max())


def test_serial_alpha0_equals_k1(tiny_loaded, shape, tokens):
    k1 = build(tiny_loaded, _cfg(shape), "deploy")(tokens)
    cfg = _cfg(shape, replicas=2, mode="serial")
    for b in cfg.blocks:
        b.gains = [1.0, 0.0]
    k2 = build(tiny_loaded, cfg, "deploy")(tokens)
    assert np.array_equal(np.array(k1), np.array(k2))


def test_parallel_identical_replicas_equal_k1(tiny_loaded, shape, tokens):
    k1 = np.array(build(tiny_loaded, _cfg(shape), "deploy")(tokens))
    for K in (2, 3):
        k = np.array(build(tiny_loaded, _cfg(shape, replicas=K, mode="parallel"), "deploy")(tokens))
        assert np.allclose(k, k1, atol=1e-4, rtol=1e-4)


def test_serial_alpha1_copy_equals_block_listed_twice(tiny_loaded, shape, tokens):
    cfg = _cfg(shape, replicas=2, mode="serial")
    assert all(b.gains == [1.0, 1.0] for b in cfg.blocks)
    ours = np.array(build(tiny_loaded, cfg, "deploy")(tokens))
    ref = np.array(_plain_quantized(tiny_loaded, duplicate=True)(tokens))
    assert np.array_equal(ours, ref)


def test_replicas_other_than_copy_change_the_output(tiny_loaded, shape, tokens):
    base = np.array(build(tiny_loaded, _cfg(shape, replicas=2, mode="parallel"), "simulate")(tokens))
    for init in ("lsq", "gamma", "offset"):
        out = np.array(build(tiny_loaded, _cfg(shape, replicas=2, mode="parallel", init=init), "simulate")(tokens))
        assert not np.allclose(out, base), init


@pytest.mark.parametrize("mode", ["serial", "parallel"])
def test_incremental_decoding_matches_full_forward(tiny_loaded, shape, tokens, mode):
    cfg = _cfg(shape, replicas=2, mode=mode, init="lsq")
    cfg.blocks[1].gains = [1.0, 0.5] if mode == "serial" else [0.7, 0.4]
    cfg.blocks[2].residual_gain = 0.8
    model = build(tiny_loaded, cfg, "deploy")
    x = tokens[:1]
    full = np.array(model(x))
    cache = model.make_cache()
    assert len(cache) == 6
    outs = [np.array(model(x[:, :10], cache=cache))]
    for t in range(10, x.shape[1]):
        outs.append(np.array(model(x[:, t:t + 1], cache=cache)))
    inc = np.concatenate(outs, axis=1)
    assert np.allclose(inc, full, atol=2e-4, rtol=1e-3)


def test_deploy_shares_codes_and_memory_ratio(tiny_loaded, shape):
    m1 = build(tiny_loaded, _cfg(shape), "deploy")
    m2 = build(tiny_loaded, _cfg(shape, replicas=2, mode="serial"), "deploy")
    for b in m2.blocks:
        assert b.replicas[0].self_attn.q_proj.weight is b.replicas[1].self_attn.q_proj.weight
    ratio = deploy_block_bytes(m2) / deploy_block_bytes(m1)
    # codes 2 bits + per replica 0.5 bit of fp16 scale+bias per weight at g64: 3.0 / 2.5
    assert ratio == pytest.approx(1.2, abs=1e-6)


def test_accounting_bits(shape):
    acc = accounting(_cfg(shape, bits=2, group_size=64), shape)
    assert acc["bits_per_weight"] == pytest.approx(2.5, abs=1e-9)
    acc2 = accounting(_cfg(shape, bits=2, group_size=64, replicas=2, mode="parallel"), shape)
    # second replica stores its own fp16 scale+bias per group (+0.5), plus two w values per block
    assert acc2["bits_per_weight"] == pytest.approx(3.0, abs=1e-3)
    assert acc2["flops_ratio"] > 1.8
    acc3 = accounting(_cfg(shape, bits=2, group_size=64, replicas=2, granularity="channel"), shape)
    H, I = 256, 512
    dims = [(256, H), (128, H), (128, H), (H, 256), (I, H), (I, H), (H, I)]
    params = sum(o * i for o, i in dims)
    extra = 16 * (sum(2 * o for o, _ in dims) + 1) / params  # per-row scale+offset, one α
    assert acc3["bits_per_weight"] == pytest.approx(2.5 + extra, rel=1e-9)


def test_generate_runs_with_mlx_lm(tiny_loaded, shape):
    from mlx_lm.generate import stream_generate

    model = build(tiny_loaded, _cfg(shape, replicas=2, mode="serial"), "deploy")
    text = "".join(r.text for r in stream_generate(model, tiny_loaded.tokenizer, "Paris is", max_tokens=5))
    assert isinstance(text, str)
