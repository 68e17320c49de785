"""The budgeted search and the sweep table on the tiny model (fast settings)."""
import math

import mlx.core as mx

import pytest

from dupstudio.core import search as S
from dupstudio.core.calibrate import settings_from
from dupstudio.core.evaluate import make_windows, tokenize
from dupstudio.core.model_io import model_shape
from dupstudio.core.replicate import accounting
from dupstudio.core.testing import tiny_text


@pytest.fixture(scope="module")
def data(tiny_loaded):
    toks = tokenize(tiny_loaded.tokenizer, tiny_text())
    cal = make_windows(toks, 32, 4)
    ev = make_windows(toks[4 * 32:], 32, 2)
    st = settings_from("fast", seqs=4, seq_len=32, steps=2, batch=4)
    return cal, ev, st


def test_hybrid_model_float_blocks_match_fp(tiny_loaded, data):
    import mlx.core as mx

    cal, _, _ = data
    m = S.hybrid_model(tiny_loaded, S.base_config(tiny_loaded), [])
    x = mx.array(cal[:1])
    assert mx.allclose(m(x), tiny_loaded.model(x), atol=1e-4).item()


@pytest.mark.parametrize("budget", [2.5, 2.7])
def test_search_respects_budget_and_records_history(tiny_loaded, data, budget):
    cal, _, st = data
    cfg = S.search(tiny_loaded, cal, budget, settings=st, kl_windows=2, max_refine=2)
    bpw = accounting(cfg, model_shape(tiny_loaded.config))["bits_per_weight"]
    assert bpw <= budget + 1e-9
    s = cfg.provenance["search"]
    assert s["budget_bpw"] == budget and s["bits_per_weight"] == pytest.approx(bpw)
    assert any(h["phase"] == "calibrate" for h in s["history"])
    assert math.isfinite(s["kl"])
    assert "calibration" in cfg.provenance
    if budget == 2.7:  # room for a g32 block (0.17 bpw on this 3-block model)
        assert s["scores"] and s["chosen"]
        assert {r["move"] for r in s["scores"]} == set(S.DEFAULT_MOVES)
        # one group move and one replica move per block at most
        assert all(len(v.split("+")) <= 2 for v in s["chosen"].values())
    else:  # the base (2-bit g64 = 2.5 bpw) fills the budget: no scoring, the calibrated base
        assert not s["scores"] and not s["chosen"]
        assert any(h["phase"] == "score" and "no move fits" in h["note"] for h in s["history"])
        from dupstudio.core.calibrate import calibrate

        ref = calibrate(tiny_loaded, S.base_config(tiny_loaded), cal, st)
        assert sorted(ref.tensors) == sorted(cfg.tensors)
        assert all(mx.array_equal(ref.tensors[t], cfg.tensors[t]).item() for t in ref.tensors)


def test_calibration_cache_reuses_identical_work(tiny_loaded, data):
    cal, _, st = data
    cache = S.CalibrationCache()
    a = cache.calibrate(tiny_loaded, S.base_config(tiny_loaded), cal, st)
    b = cache.calibrate(tiny_loaded, S.base_config(tiny_loaded), cal, st)
    assert cache.hits == 1 and a.tensors.keys() == b.tensors.keys()
    c = cache.calibrate(tiny_loaded, S.base_config(tiny_loaded), cal[:2], st)  # other tokens: new work
    assert cache.hits == 1 and c is not None


def test_cached_reference_matches_model_reference(tiny_loaded, data):
    from dupstudio.core.evaluate import CachedReference, evaluate
    from dupstudio.core.replicate import build

    cal, _, _ = data
    win = cal[:3]
    model = build(tiny_loaded, S.base_config(tiny_loaded), "simulate")
    a = evaluate(model, win, reference=tiny_loaded.model, batch_size=2)
    ref = CachedReference(tiny_loaded.model, win, batch_size=2)
    b = evaluate(model, win, reference=ref, batch_size=2)
    assert b.ppl == a.ppl and b.kl == pytest.approx(a.kl, rel=2e-3) and b.top1_agreement == pytest.approx(
        a.top1_agreement, abs=1 / a.tokens + 1e-12)
    assert ref.nbytes == CachedReference.estimate_bytes(win, tiny_loaded.config["vocab_size"])


def test_search_latency_budget(tiny_loaded, data):
    cal, _, st = data
    shape = model_shape(tiny_loaded.config)
    base_ms = S.predicted_latency_ms(S.base_config(tiny_loaded), shape)
    cfg = S.search(tiny_loaded, cal, 3.0, budget_latency_ms=base_ms * 1.0001, settings=st,
                   kl_windows=2, max_refine=0, moves=("g32", "serial-channel"))
    assert S.predicted_latency_ms(cfg, shape) <= base_ms * 1.0001 + 1e-9
    assert all(b.replicas == 1 for b in cfg.blocks)  # a second pass costs latency


def test_search_budget_below_base(tiny_loaded, data):
    from dupstudio.core.jobs import DupstudioError

    cal, _, st = data
    with pytest.raises(DupstudioError, match="below"):
        S.search(tiny_loaded, cal, 2.0, settings=st)


def test_pareto_front():
    import pandas as pd

    df = pd.DataFrame({"bits_per_weight": [2.5, 3.0, 3.0, 4.5, 2.5],
                       "ppl": [100.0, 50.0, 60.0, 55.0, float("nan")]})
    assert list(S.pareto_front(df)) == [True, True, False, False, False]


def test_sweep_reuses_identical_calibrations_and_evaluations(tiny_loaded, data):
    """search ≤2.5 on a 2-bit g64 base admits no move: it is the calibrated K=1 row, computed once."""
    cal, ev, st = data
    jobs = [j for j in S.sweep_jobs(tiny_loaded, budgets=(2.5,), mlx_lm=()) if j.kind in ("config", "search")
            and (j.calibrate or j.kind == "search")]
    assert [j.name for j in jobs] == ["calibrated K=1 2-bit g64", "search ≤2.5 bpw"]
    df, cfgs = S.sweep(tiny_loaded, cal, ev[:2], budget_bpw=2.5, settings=st, jobs=jobs,
                       search_kwargs={"kl_windows": 2})
    a, b = df.iloc[0], df.iloc[1]
    assert df.attrs["calibration_cache_hits"] == 1 and df.attrs["evaluation_cache_hits"] == 1
    assert a["ppl"] == b["ppl"] and a["kl"] == b["kl"] and a["bits_per_weight"] == b["bits_per_weight"] == 2.5


def test_mlx_lm_rows_are_scored_dequantized_on_cpu(tiny_loaded, data):
    """On the CPU backend an mlx-lm baseline is evaluated with its weights dequantized: the same
    perplexity as its packed model (to float tolerance), at float matmul speed."""
    import mlx.core as mx

    from dupstudio.core.evaluate import evaluate

    cal, ev, st = data
    if mx.default_device() != mx.cpu:
        pytest.skip("the dequantized path is the CPU backend's")
    job = S.SweepJob("", "mlx-lm", method="plain", bits=2, group_size=64)
    ctx = S.SweepContext(tiny_loaded, cal, ev, settings=st)
    row, _ = S.run_job(ctx, job)
    assert "dequantized" in row["note"] and row["bits_per_weight"] == 2.5
    _, packed, _ = S.mlx_lm_model(tiny_loaded, cal, "plain", bits=2, group_size=64)
    want = evaluate(packed, ev, reference=tiny_loaded.model)
    assert row["ppl"] == pytest.approx(want.ppl, rel=1e-4) and row["kl"] == pytest.approx(want.kl, rel=1e-3)


def test_mlx_lm_plans_follow_the_quantized_modules(tiny_loaded, data):
    """The roofline plans of mlx-lm models: plain 2-bit g64 is the uniform plan (2-bit embedding);
    mixed_2_6 names its 6-bit linears per block; GPTQ keeps a float embedding."""
    from dupstudio.core import roofline as RF

    cal, _, _ = data
    shape = S._shape(tiny_loaded)
    _, plain, info = S.mlx_lm_model(tiny_loaded, cal, "plain", bits=2, group_size=64)
    plans, embed, head = info["plans"]
    assert [(p.bits, p.group_size, p.matrix_bits) for p in plans] == [(2, 64, None)] * shape["num_blocks"]
    assert (embed.bits, embed.group_size, head) == (2, 64, None)
    _, mixed, info = S.mlx_lm_model(tiny_loaded, cal, "mixed_2_6", bits=2, group_size=64)
    plans, embed, _ = info["plans"]
    for k, (p, layer) in enumerate(zip(plans, mixed.layers)):
        want = {n: m.bits for n, m in (("v_proj", layer.self_attn.v_proj), ("down_proj", layer.mlp.down_proj))
                if m.bits != 2}
        assert p.bits == 2 and (p.matrix_bits or {}) == want, k
    assert any(p.matrix_bits for p in plans)  # the tiny model's first and last blocks take 6 bits
    # its predicted latency lies between uniform 2-bit and uniform 6-bit plans with the same embedding
    ms = S._predicted_plans_ms(shape, "apple-m1-pro", plans, embed)
    lo = S._predicted_plans_ms(shape, "apple-m1-pro", RF.uniform_plan(shape, 2, 64), embed)
    hi = S._predicted_plans_ms(shape, "apple-m1-pro", RF.uniform_plan(shape, 6, 64), embed)
    assert lo < ms < hi
    # and the bits/weight of the row agrees with the roofline's storage count
    res = RF.predict(shape, plans, "apple-m1-pro", embed=embed)
    assert res.bits_per_weight == pytest.approx(info["bits_per_weight"])
    _, _, info = S.mlx_lm_model(tiny_loaded, cal, "gptq", bits=2, group_size=32)
    plans, embed, _ = info["plans"]
    assert {(p.bits, p.group_size) for p in plans} == {(2, 32)} and embed.bits == 16
