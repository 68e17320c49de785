"""The calibration panel shows the peak-memory estimates of both paths and the path a run takes;
a run on the streamed path goes through calibrate_streamed."""
import pytest

pytest.importorskip("PySide6")

TIMEOUT_MS = 60_000


def _panel(window, text):
    cal = window.calibration
    cal.text.set_path(str(text))
    cal.resume.setChecked(False)
    cal.set_settings(method="adam", preset="fast", seqs=4, seq_len=32, steps=2, batch=2)
    return cal


def test_memory_label_shows_both_estimates_and_picks_the_path(window, qtbot, tiny_text_file,
                                                              monkeypatch, tmp_path):
    from dupstudio.core import streaming as S
    from dupstudio.core.units import human_bytes

    p = window.project
    ev = window.evaluation
    ev.text.set_path(str(tiny_text_file))
    ev.windows.setValue(2)
    ev.ctx.setValue(32)
    with qtbot.waitSignal(ev.finished, timeout=TIMEOUT_MS):
        ev.start(full_precision=True)
    fp_before = ev.rows[-1]["ppl"]
    p.edit_blocks([1], "replicas", 2)
    cal = _panel(window, tiny_text_file)
    s = cal.settings()
    # (a run always checkpoints its finished blocks, so that a cancel can keep them)
    est = S.estimate_calibration_memory(p.loaded.config, p.config, 4, 32, s, checkpoint=True)
    text = cal.memory.text()
    assert f"in memory {human_bytes(est['in_memory_bytes'])}" in text
    assert f"streamed {human_bytes(est['streamed_bytes'])}" in text
    assert est["streamed_bytes"] < est["in_memory_bytes"]
    assert text.endswith("<b>in memory</b>") and cal.will_stream is False
    assert cal.memory_estimate["in_memory_bytes"] == est["in_memory_bytes"]
    # K = 2 on block 1 is counted: the same settings with K = 1 everywhere estimate less
    from dupstudio.core import config as C
    from dupstudio.core.model_io import model_shape

    k1 = S.estimate_calibration_memory(p.loaded.config, C.new_config(model_shape(p.loaded.config)),
                                       4, 32, s)
    assert k1["in_memory_bytes"] < est["in_memory_bytes"]

    # not enough memory for the in-memory path (beyond the model the app holds): streamed
    monkeypatch.setattr(S, "available_memory", lambda: 1000)
    cal.seqs.setValue(5)  # any settings change refreshes the label
    assert cal.will_stream is True
    assert "streamed</b>" in cal.memory.text() and "available 1.0 KB" in cal.memory.text()
    window.tabs.setCurrentWidget(cal)
    cal.grab().save(str(tmp_path / "calibration-memory.png"))
    with qtbot.waitSignal(cal.finished, timeout=TIMEOUT_MS) as sig:
        assert cal.start()
        assert "streamed" in cal.bar.message.text()
    assert sig.args == ["done"], cal.last_message
    prov = p.config.provenance["calibration"]
    assert prov["streamed"] is True
    assert all(b.calibration and b.calibration["steps"] == 2 for b in p.config.blocks)
    # the open model's weights were released block by block (to lazy reads of its files): it
    # still evaluates to the same full-precision perplexity
    with qtbot.waitSignal(ev.finished, timeout=TIMEOUT_MS) as sig:
        ev.start(full_precision=True)
    assert sig.args == ["done"]
    assert ev.rows[-1]["ppl"] == fp_before
    monkeypatch.undo()
    cal.update_memory()
    assert cal.will_stream is False
