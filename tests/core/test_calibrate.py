"""Calibration on the tiny model: lowers block loss, guard, cancel, resume, methods."""
import mlx.core as mx
import numpy as np
import pytest

from dupstudio.core import config as C
from dupstudio.core.calibrate import block_forward, calibrate, settings_from, weighted_lsq
from dupstudio.core.evaluate import make_windows, tokenize
from dupstudio.core.jobs import CancelToken, Cancelled, DupstudioError
from dupstudio.core.replicate import build


def _settings(**kw):
    base = dict(steps=6, seqs=8, seq_len=32, batch=4)
    base.update(kw)
    return settings_from("fast", **base)


def test_block_forward_matches_mlx_lm_block(tiny_loaded):
    layer = tiny_loaded.model.model.layers[1]
    x = mx.random.normal((2, 9, 256))
    assert np.allclose(np.array(block_forward(layer, x, "causal")), np.array(layer(x, "causal")), atol=1e-5)


@pytest.mark.parametrize("method", ["adam", "stats", "grid"])
@pytest.mark.parametrize("K,mode", [(1, "serial"), (2, "serial"), (2, "parallel")])
def test_calibration_lowers_block_loss_and_records_it(tiny_loaded, shape, cal, method, K, mode):
    cfg = C.new_config(shape, replicas=K, mode=mode)
    out = calibrate(tiny_loaded, cfg, cal, _settings(method=method))
    for b in out.blocks:
        rec = b.calibration
        assert rec["loss_after"] <= rec["loss_before"]
        assert rec["method"] == method
    assert any(b.calibration["accepted"] for b in out.blocks)
    assert out.blocks[0].calibration["loss_after"] < out.blocks[0].calibration["loss_before"]
    # the configuration really holds the tuned parameters: the built block reproduces the loss
    model = build(tiny_loaded, out, "simulate")
    assert np.isfinite(np.array(model(mx.array(cal[:2])))).all()
    assert "calibration" in out.provenance


def test_guard_never_accepts_worse(tiny_loaded, shape, cal, monkeypatch):
    """Sabotage the optimiser: every step pushes the scales up; the guard must refuse."""
    import mlx.optimizers as optim

    real = optim.Adam.apply_gradients

    def bad(self, grads, params):
        return __import__("mlx.utils", fromlist=["tree_map"]).tree_map(lambda p: p + 0.5, params)

    monkeypatch.setattr(optim.Adam, "apply_gradients", bad)
    cfg = C.new_config(shape)
    out = calibrate(tiny_loaded, cfg, cal, _settings(init="rtn", holdout=0.0))
    monkeypatch.setattr(optim.Adam, "apply_gradients", real)
    for b in out.blocks:
        assert not b.calibration["accepted"]
        assert b.calibration["loss_after"] == b.calibration["loss_before"]
    assert not any(k.endswith(".scales") for k in out.tensors)
    # and the built model equals the uncalibrated one
    x = mx.array(cal[:2])
    assert np.array_equal(np.array(build(tiny_loaded, out, "deploy")(x)),
                          np.array(build(tiny_loaded, cfg, "deploy")(x)))


def test_cancellation_stops_within_one_step(tiny_loaded, shape, cal):
    tok = CancelToken()
    seen = []

    def on_loss(block, step, loss):
        seen.append((block, step))
        if len(seen) == 2:
            tok.cancel()

    with pytest.raises(Cancelled):
        calibrate(tiny_loaded, C.new_config(shape), cal, _settings(steps=50), cancel=tok, on_loss=on_loss)
    assert len(seen) == 2


def _stop_after_block0(loaded, cfg, cal, s, ck):
    """A run into checkpoint folder ``ck`` cancelled once block 1 has started."""
    tok = CancelToken()

    def stop(frac, msg):
        if msg.startswith("block 1: step"):
            tok.cancel()

    with pytest.raises(Cancelled):
        calibrate(loaded, cfg, cal, s, checkpoint_dir=ck, cancel=tok, progress=stop)


def test_resume_gives_the_same_result(tiny_loaded, shape, cal, tmp_path):
    s = _settings(steps=4)
    full = calibrate(tiny_loaded, C.new_config(shape), cal, s)
    _stop_after_block0(tiny_loaded, C.new_config(shape), cal, s, tmp_path)
    assert (tmp_path / "block_000.json").exists() and not (tmp_path / "block_001.json").exists()
    resumed = calibrate(tiny_loaded, C.new_config(shape), cal, s, checkpoint_dir=tmp_path)
    for a, b in zip(full.blocks, resumed.blocks):
        assert a.calibration["loss_after"] == pytest.approx(b.calibration["loss_after"], rel=1e-5)


def test_a_checkpoint_of_another_run_is_refused_not_resumed(tiny_loaded, shape, cal, tmp_path):
    """Blocks finished for one configuration/text must not be spliced into another run."""
    s = _settings(steps=2)
    _stop_after_block0(tiny_loaded, C.new_config(shape), cal, s, tmp_path)
    assert not (tmp_path / "lock").exists()  # released when the run ended
    other_cfg = C.new_config(shape, strategy="percentile")
    with pytest.raises(DupstudioError, match="another run"):
        calibrate(tiny_loaded, other_cfg, cal, s, checkpoint_dir=tmp_path)
    with pytest.raises(DupstudioError, match="another run"):
        calibrate(tiny_loaded, C.new_config(shape), cal[::-1].copy(), s, checkpoint_dir=tmp_path)
    with pytest.raises(DupstudioError, match="another run"):
        calibrate(tiny_loaded, C.new_config(shape), cal, _settings(steps=3), checkpoint_dir=tmp_path)
    # the same run again resumes (block 0 from its checkpoint)
    msgs = []
    calibrate(tiny_loaded, C.new_config(shape), cal, s, checkpoint_dir=tmp_path,
              progress=lambda f, m: msgs.append(m))
    assert any("block 0: resumed from checkpoint" in m for m in msgs)


def test_two_runs_on_one_checkpoint_folder_collide_with_a_message(tiny_loaded, shape, cal, tmp_path):
    import os
    import subprocess
    import sys

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp_path.mkdir(exist_ok=True)
        (tmp_path / "lock").write_text(str(live.pid))
        with pytest.raises(DupstudioError, match=f"process {live.pid}"):
            calibrate(tiny_loaded, C.new_config(shape), cal, _settings(steps=1), checkpoint_dir=tmp_path)
        assert (tmp_path / "lock").read_text() == str(live.pid)  # the other run's lock is left alone
    finally:
        live.kill()
        live.wait()
    # a lock left by a process that is gone is taken over
    out = calibrate(tiny_loaded, C.new_config(shape), cal, _settings(steps=1), checkpoint_dir=tmp_path)
    assert out.blocks[0].calibration is not None and not (tmp_path / "lock").exists()
    assert not list(tmp_path.glob(".*.tmp-*")) and os.getpid()  # no temp files left behind


def test_replicas_start_at_k1(tiny_loaded, shape, cal):
    """Zero Adam steps: a K=2 block calibrates to α=0 (serial) / w=[1,0] (parallel)."""
    for mode, gains in (("serial", [1.0, 0.0]), ("parallel", [1.0, 0.0])):
        out = calibrate(tiny_loaded, C.new_config(shape, replicas=2, mode=mode), cal,
                        _settings(steps=0, init="rtn"))
        for b in out.blocks:
            if b.calibration["accepted"]:
                assert b.gains == gains


def test_weighted_lsq_is_exact_when_representable():
    mx.random.seed(0)
    codes = mx.random.randint(0, 4, (8, 64)).astype(mx.uint8)
    s = mx.random.uniform(0.5, 1.5, (8, 2))
    b = mx.random.normal((8, 2))
    w = (s[..., None] * codes.reshape(8, 2, 32).astype(mx.float32) + b[..., None]).reshape(8, 64)
    X = mx.random.normal((500, 64))
    sigma = X.T @ X / 500
    s2, b2 = weighted_lsq(w, codes, 32, sigma, s * 0 + 1, b * 0, ridge=0.0)
    assert np.allclose(np.array(s2), np.array(s), atol=1e-3)
    assert np.allclose(np.array(b2), np.array(b), atol=1e-3)


def test_text_too_short_for_calibration(tiny_loaded):
    with pytest.raises(DupstudioError, match="too short"):
        make_windows(tokenize(tiny_loaded.tokenizer, "just a few words"), 256, 32, what="calibration text")


def test_bad_settings():
    with pytest.raises(DupstudioError, match="unknown calibration method"):
        settings_from("fast", method="magic")
    with pytest.raises(DupstudioError, match="unknown preset"):
        settings_from("medium")
