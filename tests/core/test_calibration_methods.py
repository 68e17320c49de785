"""Code choice (GPTQ) and the end-to-end KL stage, each against an independent computation."""
import mlx.core as mx
import numpy as np
import pytest

from dupstudio.core import config as C
from dupstudio.core import quant
from dupstudio.core.calibrate import calibrate, settings_from
from dupstudio.core.calibration.e2e import kl_loss, tune_end_to_end
from dupstudio.core.calibration.gptq import gptq_codes, gptq_reference
from dupstudio.core.evaluate import make_windows, tokenize
from dupstudio.core.jobs import DupstudioError
from dupstudio.core.replicate import build


def _layer(seed=0, out=48, inn=256):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(out, inn)) * 0.05
    mix = np.eye(inn) + 0.3 * rng.normal(size=(inn, inn)) / np.sqrt(inn)
    x = rng.normal(size=(1024, inn)) @ mix
    x[:, 7] = 0.0  # a dead input column
    return w, x.T @ x / len(x)


def _weighted_error(w, h, codes, s, b, g):
    out_f, in_f = w.shape
    deq = (s[:, :, None] * codes.reshape(out_f, -1, g) + b[:, :, None]).reshape(out_f, in_f)
    d = deq - w
    d[:, np.diag(h) <= 0] = 0.0
    return float(np.einsum("oi,ij,oj->", d, h, d))


@pytest.mark.parametrize("bits,g", [(2, 64), (3, 32)])
def test_gptq_equals_the_textbook_column_loop(bits, g):
    """The blocked Cholesky form and the one-column-at-a-time inverse-Hessian downdate are the
    same algorithm; both run in float64, so codes agree except where a value sits within
    rounding noise of a grid midpoint (allowed: one code in a thousand)."""
    w, h = _layer()
    codes, _, _ = gptq_codes(w, h, bits, g)
    ref = gptq_reference(w, h, bits, g)
    assert codes.shape == w.shape and codes.dtype == np.uint8
    assert np.mean(codes == ref) >= 0.999
    assert codes.max() <= (1 << bits) - 1


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_output_error_against_round_to_nearest(act_order):
    w, h = _layer(1)
    g = 64
    c, s, b = gptq_codes(w, h, 2, g, act_order=act_order)
    p = quant.compute_params(mx.array(w.astype(np.float32)), 2, g)
    rc = np.array(quant.quantize_codes(mx.array(w.astype(np.float32)), p))
    e_rtn = _weighted_error(w, h, rc, np.array(p.scales), np.array(p.biases), g)
    e_gptq = _weighted_error(w, h, c, s, b, g)
    assert e_gptq < 0.95 * e_rtn


def test_gptq_refuses_mismatched_or_broken_statistics():
    w, h = _layer()
    with pytest.raises(DupstudioError, match="Hessian"):
        gptq_codes(w, h[:10, :10], 2, 64)
    h2 = h.copy()
    h2[0, 0] = np.nan
    with pytest.raises(DupstudioError, match="not finite"):
        gptq_codes(w, h2, 2, 64)


def test_calibrate_with_gptq_codes_beats_rtn_codes_on_the_first_block(tiny_loaded, shape, cal):
    """Block 0 sees the same inputs either way; with no Adam steps the difference is the code
    choice alone (plus each method's own start scales)."""
    s = dict(steps=0, seqs=8, seq_len=32, batch=4, init="rtn")
    rtn = calibrate(tiny_loaded, C.new_config(shape), cal, settings_from("fast", **s))
    gq = calibrate(tiny_loaded, C.new_config(shape), cal, settings_from("fast", codes="gptq", **s))
    r0, g0 = rtn.blocks[0].calibration, gq.blocks[0].calibration
    assert g0["accepted"] and g0["loss_after"] < 0.9 * r0["loss_before"]
    assert not np.array_equal(np.array(gq.tensors["b0.q_proj.codes"]),
                              np.array(quant.pack_codes(quant.quantize_codes(
                                  tiny_loaded.model.model.layers[0].self_attn.q_proj.weight,
                                  quant.compute_params(tiny_loaded.model.model.layers[0].self_attn
                                                       .q_proj.weight, 2, 64)), 2)))
    assert gq.provenance["calibration"]["settings"]["codes"] == "gptq"


def _held_kl(loaded, cfg, tokens):
    x = mx.array(tokens)[:, :-1]
    return float(kl_loss(build(loaded, cfg, "simulate")(x), loaded.model(x)).item())


@pytest.mark.parametrize("K,mode", [(1, "serial"), (2, "parallel")])
def test_end_to_end_lowers_held_out_kl_and_the_saved_config_reproduces_it(tiny_loaded, shape, cal, K, mode):
    from dupstudio.core.testing import tiny_text

    # more sequences than the other tests: the random tiny model over-fits 6 training sequences
    # within a few steps (training KL falls by 4x while the held-out KL rises)
    cal = make_windows(tokenize(tiny_loaded.tokenizer, tiny_text(40000)), 32, 32)
    cfg = C.new_config(shape, replicas=K, mode=mode)
    new, rec = tune_end_to_end(tiny_loaded, cfg, cal, steps=24, lr=1e-3, batch=4, holdout=0.25)
    assert rec.accepted and rec.kl_after < 0.99 * rec.kl_before
    # the held-out sequences (a quarter of 32, chosen by the seed) measured independently on the
    # model built from the written configuration: the same KL up to the float16 storage of the
    # scales and biases (a few per cent at most)
    hold = np.sort(np.random.default_rng(0).permutation(cal.shape[0])[:8])
    assert _held_kl(tiny_loaded, cfg, cal[hold]) == pytest.approx(rec.kl_before, rel=1e-4)
    assert _held_kl(tiny_loaded, new, cal[hold]) == pytest.approx(rec.kl_after, rel=0.05)
    if K == 2:
        assert new.blocks[0].gains != cfg.blocks[0].gains  # the replica weights were tuned


def test_end_to_end_guard_keeps_the_configuration_when_it_gets_worse(tiny_loaded, shape, cal, monkeypatch):
    """Sabotage the optimiser (every step shrinks all scales by e^-1.5): the guard must refuse."""
    import mlx.optimizers as optim
    from mlx.utils import tree_map

    monkeypatch.setattr(optim.Adam, "apply_gradients",
                        lambda self, grads, params: tree_map(lambda g, p: p - 1.5, grads, params))
    cfg = C.new_config(shape)
    new, rec = tune_end_to_end(tiny_loaded, cfg, cal, steps=4, lr=1e-3, batch=4, evals=2)
    assert rec.held_out[-1][1] > rec.kl_before  # the sabotage did make it worse
    assert not rec.accepted and rec.kl_after == rec.kl_before
    assert set(new.tensors) == set(cfg.tensors)


def test_pipeline_settings_and_refusals(tiny_loaded, shape, cal):
    with pytest.raises(DupstudioError, match="code choice"):
        settings_from("fast", codes="magic")
    with pytest.raises(DupstudioError, match="out of range"):
        settings_from("fast", e2e_steps=-1)
    with pytest.raises(DupstudioError, match="streaming"):
        calibrate(tiny_loaded, C.new_config(shape), cal, settings_from("fast", method="e2e", e2e_steps=2),
                  stream=True)
    out = calibrate(tiny_loaded, C.new_config(shape), cal,
                    settings_from("fast", method="e2e", e2e_steps=3, batch=4))
    e = out.provenance["calibration"]["end_to_end"]
    assert e["steps"] == 3 and e["kl_after"] <= e["kl_before"]


def _codes(cfg, k, m, bits, width):
    return np.array(quant.unpack_codes(cfg.tensors[f"b{k}.{m}.codes"], bits, width))


@pytest.mark.parametrize("codes", ["rtn", "gptq"])
def test_learned_rounding_with_a_vanishing_step_is_plain_adam(tiny_loaded, shape, cal, codes):
    """The latent codes start at the starting codes (plus each weight's distance to them, inside
    ±0.49 of a code), so with a step too small to cross a rounding boundary learned rounding is
    exactly the scale/bias tuning over those codes: same codes, same losses, same tensors."""
    s = dict(steps=6, seqs=8, seq_len=32, batch=4, codes=codes)
    a = calibrate(tiny_loaded, C.new_config(shape), cal, settings_from("fast", **s), blocks=[0])
    b = calibrate(tiny_loaded, C.new_config(shape), cal, settings_from("fast", method="ap", ap_lr=1e-9, **s),
                  blocks=[0])
    ra, rb = a.blocks[0].calibration, b.blocks[0].calibration
    assert rb["method"] == "ap" and rb["loss_after"] == ra["loss_after"]
    for key in a.tensors:
        assert np.array_equal(np.array(a.tensors[key]), np.array(b.tensors[key])), key


def _block0_loss(loaded, cfg, tokens):
    """Block 0's output error of configuration ``cfg`` on ``tokens``, built the way the quantized
    model runs it (replicate's path, not the calibration's own parametrisation)."""
    from dupstudio.core import adapters
    from dupstudio.core.calibration.block import block_forward, configured_block, embed_inputs

    x = embed_inputs(loaded, loaded.model.model.embed_tokens, mx.array(tokens))
    mask = adapters.of_model(loaded.model).causal_mask(loaded.model.args, 0, tokens.shape[1])
    y = block_forward(loaded.model.model.layers[0], x, mask)
    d = configured_block(loaded, cfg, 0)(x, mask) - y
    return float(mx.mean(d * d).item())


def test_learned_rounding_moves_a_few_codes_and_the_written_block_has_the_loss_it_reports(tiny_loaded, shape, cal):
    # no held-out sequences: the random tiny model's 2 held-out sequences rarely improve, so early
    # stopping would keep the start and test nothing
    s = dict(steps=30, seqs=8, seq_len=32, batch=4, holdout=0.0)
    a = calibrate(tiny_loaded, C.new_config(shape), cal, settings_from("fast", method="adam", **s), blocks=[0])
    b = calibrate(tiny_loaded, C.new_config(shape), cal, settings_from("fast", method="ap", ap_lr=5e-3, **s),
                  blocks=[0])
    rb = b.blocks[0].calibration
    assert rb["accepted"] and rb["loss_after"] < 0.9 * rb["loss_before"]
    width = tiny_loaded.model.model.layers[0].self_attn.q_proj.weight.shape[1]
    ca, cb = _codes(a, 0, "q_proj", 2, width).astype(int), _codes(b, 0, "q_proj", 2, width).astype(int)
    moved = np.mean(ca != cb)
    # some codes move, by one step mostly: learned rounding refines, it does not re-quantize
    assert 0.0 < moved < 0.2 and np.abs(ca - cb).max() <= 2
    # the frozen codes and the stored (float16) scales reproduce the loss the run reports
    assert _block0_loss(tiny_loaded, b, cal[:8]) == pytest.approx(rb["loss_after"], rel=0.02)
    assert _block0_loss(tiny_loaded, C.new_config(shape), cal[:8]) == pytest.approx(rb["loss_before"], rel=1e-4)


def test_learned_rounding_guard_keeps_the_starting_codes_when_it_gets_worse(tiny_loaded, shape, cal, monkeypatch):
    """Sabotage the optimiser (every step pushes every latent code and scale up): the block's
    loss rises, so the guard keeps the configuration as it was (round-to-nearest codes)."""
    import mlx.optimizers as optim
    from mlx.utils import tree_map

    monkeypatch.setattr(optim.Adam, "apply_gradients",
                        lambda self, grads, params: tree_map(lambda g, p: p + 3.0, grads, params))
    cfg = C.new_config(shape)
    out = calibrate(tiny_loaded, cfg, cal, settings_from("fast", method="ap", steps=3, seqs=8, seq_len=32,
                                                        batch=4, holdout=0.0), blocks=[0])
    r = out.blocks[0].calibration
    assert not r["accepted"] and r["loss_after"] == r["loss_before"]
    assert set(out.tensors) == set(cfg.tensors)


def test_learned_rounding_setting_is_checked():
    with pytest.raises(DupstudioError, match="learned-rounding"):
        settings_from("fast", method="ap", ap_lr=0.0)
