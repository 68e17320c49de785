"""Evaluation: perplexity against an independent computation, KL/agreement, errors."""
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from dupstudio.core.evaluate import bootstrap_ppl, evaluate, make_windows, tokenize
from dupstudio.core.jobs import CancelToken, Cancelled, DupstudioError


class FixedLogits(nn.Module):
    """A 'model' whose next-token distribution is the same table for every position."""

    def __init__(self, table):
        super().__init__()
        self.table = mx.array(table, dtype=mx.float32)

    def __call__(self, x):
        return mx.broadcast_to(self.table, (*x.shape, self.table.shape[0]))


def test_perplexity_equals_exp_mean_nll_hand_case():
    logits = np.log(np.array([0.5, 0.25, 0.125, 0.125]))
    windows = np.array([[0, 1, 2, 3], [3, 0, 0, 1]])
    r = evaluate(FixedLogits(logits), windows, batch_size=1)
    # targets: [1,2,3] and [0,0,1] -> probabilities .25 .125 .125 .5 .5 .25
    nll = -np.log([0.25, 0.125, 0.125, 0.5, 0.5, 0.25]).mean()
    assert r.ppl == pytest.approx(math.exp(nll), rel=1e-6)
    assert r.tokens == 6 and r.windows == 2


def test_kl_and_agreement_hand_case():
    p = np.array([0.7, 0.1, 0.1, 0.1])
    q = np.array([0.1, 0.7, 0.1, 0.1])
    windows = np.array([[0, 1, 2]])
    r = evaluate(FixedLogits(np.log(q)), windows, reference=FixedLogits(np.log(p)))
    assert r.kl == pytest.approx(float((p * np.log(p / q)).sum()), rel=1e-5)
    assert r.top1_agreement == 0.0
    r2 = evaluate(FixedLogits(np.log(p)), windows, reference=FixedLogits(np.log(p)))
    assert r2.kl == pytest.approx(0.0, abs=1e-6) and r2.top1_agreement == 1.0


def test_bootstrap_interval_contains_point_estimate():
    rng = np.random.default_rng(0)
    sums = rng.uniform(100, 200, 40)
    toks = np.full(40, 50)
    lo, hi = bootstrap_ppl(sums, toks)
    point = math.exp(sums.sum() / toks.sum())
    assert lo < point < hi


def test_windows_too_short_is_a_clear_error():
    with pytest.raises(DupstudioError, match="too short: 100 tokens give 0 windows of 512"):
        make_windows(np.arange(100), 512, 1)


def test_cancel_stops(tiny_loaded):
    tok = CancelToken()
    tok.cancel()
    with pytest.raises(Cancelled):
        evaluate(tiny_loaded.model, np.zeros((2, 16), dtype=np.int32), cancel=tok)


def test_tiny_model_perplexity_matches_independent_loop(tiny_loaded):
    from dupstudio.core.testing import tiny_text

    ids = tokenize(tiny_loaded.tokenizer, tiny_text(4000))
    w = make_windows(ids, 32, 3)
    r = evaluate(tiny_loaded.model, w, batch_size=2)
    nll = []
    for row in w:
        logits = np.array(tiny_loaded.model(mx.array(row[None, :-1])))[0].astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        nll += [-logp[i, t] for i, t in enumerate(row[1:])]
    assert r.ppl == pytest.approx(math.exp(np.mean(nll)), rel=1e-4)
