"""Per-block sensitivity on the tiny model (fast settings): the cached fast path against the
straightforward definition (calibrate(blocks=[k]) + hybrid-model KL)."""
import numpy as np
import pytest

from dupstudio.core import search as S
from dupstudio.core import sensitivity as SENS
from dupstudio.core.calibrate import settings_from
from dupstudio.core.evaluate import make_windows, tokenize
from dupstudio.core.jobs import Cancelled, CancelToken, DupstudioError
from dupstudio.core.testing import tiny_text


@pytest.fixture(scope="module")
def data(tiny_loaded):
    toks = tokenize(tiny_loaded.tokenizer, tiny_text())
    cal = make_windows(toks, 32, 4)
    st = settings_from("fast", seqs=4, seq_len=32, steps=2, batch=4)
    return cal, st


def test_sensitivity_one_row_per_block(tiny_loaded, data):
    cal, st = data
    seen = []
    df = SENS.sensitivity(tiny_loaded, S.base_config(tiny_loaded), cal, settings=st, kl_windows=2,
                          progress=lambda f, m: seen.append(f))
    assert list(df["block"]) == list(range(tiny_loaded.num_blocks))
    assert tuple(df.columns) == SENS.COLUMNS
    for col in ("kl_quantized", "kl_k1", "kl_k2", "kl_gain"):
        assert np.isfinite(df[col]).all(), col
    assert (df["kl_quantized"] > 0).all()
    assert (df["bits_per_weight_k2"] > df["bits_per_weight"]).all()
    fr = [f for f in seen if f is not None]
    assert fr == sorted(fr) and fr[-1] == pytest.approx(1.0)


@pytest.mark.parametrize("mode", ["serial", "parallel"])
def test_sensitivity_matches_reference_definition(tiny_loaded, data, mode):
    """The fast path (one FP walk, cached block inputs and reference log-probs) gives what
    calibrate(blocks=[k]) plus a whole hybrid-model evaluation give."""
    cal, _ = data
    # enough steps, no hold-out, a larger rate: the second replica moves (kl_k2 != kl_k1)
    st = settings_from("fast", seqs=4, seq_len=32, steps=12, batch=4, holdout=0.0, lr=0.02)
    base = S.base_config(tiny_loaded)
    blocks = [2, 0] if mode == "serial" else [1]
    fast = SENS.sensitivity(tiny_loaded, base, cal, settings=st, kl_windows=3, blocks=blocks, replica_mode=mode)
    ref = SENS.sensitivity_reference(tiny_loaded, base, cal, settings=st, kl_windows=3, blocks=blocks,
                                     replica_mode=mode)
    assert list(fast["block"]) == blocks
    for col in ("kl_quantized", "kl_k1", "kl_k2", "kl_gain", "bits_per_weight", "bits_per_weight_k2"):
        np.testing.assert_allclose(fast[col].to_numpy(), ref[col].to_numpy(), rtol=1e-4, atol=1e-7,
                                   err_msg=col)
    assert (fast["kl_k2"] != fast["kl_k1"]).any()


def test_cached_kl_equals_hybrid_model_kl(tiny_loaded, data):
    """Running blocks k..end from the cached FP input of block k gives the hybrid model's KL."""
    cal, _ = data
    cfg = S.base_config(tiny_loaded)
    win = cal[:3]  # 3 windows: a full and a partial batch
    kc = SENS._KLCache(tiny_loaded, win, range(tiny_loaded.num_blocks), CancelToken())
    for k in range(tiny_loaded.num_blocks):
        want = S.calibration_kl(tiny_loaded, S.hybrid_model(tiny_loaded, cfg, [k]), win)
        got = kc.kl(k, SENS._sim_block(tiny_loaded, cfg, k), CancelToken())
        assert got == pytest.approx(want, rel=1e-5, abs=1e-9), k


def test_sensitivity_without_replica(tiny_loaded, data):
    cal, st = data
    df = SENS.sensitivity(tiny_loaded, S.base_config(tiny_loaded), cal, settings=st, kl_windows=2,
                          with_replica=False, blocks=[1])
    assert list(df["block"]) == [1] and "kl_gain" not in df.columns
    assert df["kl_quantized"].iloc[0] > 0


def test_sensitivity_cancel(tiny_loaded, data):
    cal, st = data
    tok = CancelToken()
    tok.cancel()
    with pytest.raises(Cancelled):
        SENS.sensitivity(tiny_loaded, S.base_config(tiny_loaded), cal, settings=st, cancel=tok)


def test_sensitivity_bad_arguments(tiny_loaded, data):
    cal, st = data
    base = S.base_config(tiny_loaded)
    with pytest.raises(DupstudioError, match="not a block of this model"):
        SENS.sensitivity(tiny_loaded, base, cal, settings=st, blocks=[7])
    with pytest.raises(DupstudioError, match="serial or parallel"):
        SENS.sensitivity(tiny_loaded, base, cal, settings=st, replica_mode="diagonal")


def test_parse_blocks():
    assert SENS.parse_blocks(None, 4) == [0, 1, 2, 3]
    assert SENS.parse_blocks("0,5, 2-3,5", 8) == [0, 5, 2, 3]
    assert SENS.parse_blocks([3, 1], 4) == [3, 1]
    for bad, msg in (("x", "not a block number"), ("3-1", "not a block number"), ("9", "0-7"),
                     ("-1", "not a block"), ("", "no block"), ("1,,", None)):
        if msg is None:
            assert SENS.parse_blocks(bad, 8) == [1]
            continue
        with pytest.raises(DupstudioError, match=msg):
            SENS.parse_blocks(bad, 8)


def test_top_gain_blocks():
    import pandas as pd

    df = pd.DataFrame({"block": [0, 1, 2, 3], "kl_gain": [0.1, -0.2, 0.5, float("nan")]})
    assert SENS.top_gain_blocks(df, 2) == [2, 0]
    assert SENS.top_gain_blocks(df, 5) == [2, 0]
    assert SENS.top_gain_blocks(df.drop(columns="kl_gain"), 2) == []
