"""Per-block sensitivity, the budgeted search and the sweep table on the tiny model (fast settings)."""
import math

import numpy as np
import pytest

from dupstudio.core import search as S
from dupstudio.core import sensitivity as SENS
from dupstudio.core.calibrate import settings_from
from dupstudio.core.evaluate import make_windows, tokenize
from dupstudio.core.jobs import Cancelled, CancelToken
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


def test_sensitivity_one_row_per_block(tiny_loaded, data):
    cal, _, st = data
    seen = []
    df = SENS.sensitivity(tiny_loaded, S.base_config(tiny_loaded), cal, settings=st, kl_windows=2,
                       progress=lambda f, m: seen.append(f))
    assert list(df["block"]) == list(range(tiny_loaded.num_blocks))
    for col in ("kl_quantized", "kl_k1", "kl_k2", "kl_gain"):
        assert np.isfinite(df[col]).all(), col
    assert (df["kl_quantized"] > 0).all()
    assert seen and seen[-1] == pytest.approx(1.0)


def test_sensitivity_cancel(tiny_loaded, data):
    cal, _, st = data
    tok = CancelToken()
    tok.cancel()
    with pytest.raises(Cancelled):
        SENS.sensitivity(tiny_loaded, S.base_config(tiny_loaded), cal, settings=st, cancel=tok)


def test_hybrid_model_float_blocks_match_fp(tiny_loaded, data):
    import mlx.core as mx

    cal, _, _ = data
    m = S.hybrid_model(tiny_loaded, S.base_config(tiny_loaded), [])
    x = mx.array(cal[:1])
    assert mx.allclose(m(x), tiny_loaded.model(x), atol=1e-4).item()


@pytest.mark.parametrize("budget", [2.5, 2.6])
def test_search_respects_budget_and_records_history(tiny_loaded, data, budget):
    cal, _, st = data
    cfg = S.search(tiny_loaded, cal, budget, settings=st, kl_windows=2, max_refine=2)
    bpw = accounting(cfg, model_shape(tiny_loaded.config))["bits_per_weight"]
    assert bpw <= budget + 1e-9
    s = cfg.provenance["search"]
    assert s["budget_bpw"] == budget and s["bits_per_weight"] == pytest.approx(bpw)
    assert any(h["phase"] == "calibrate" for h in s["history"])
    assert math.isfinite(s["kl"]) and s["scores"]
    assert "calibration" in cfg.provenance
    if budget == 2.6:  # room for at least a channel replica
        assert s["chosen"]


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
