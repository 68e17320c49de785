"""Calibration in the worker: to the end, cancelled, and the event loop keeps turning meanwhile."""
import threading
import time

import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import QTimer  # noqa: E402

from dupstudio.gui.panels.layers import COL  # noqa: E402

TIMEOUT_MS = 60_000


def _setup(window, text, **kw):
    cal = window.calibration
    cal.text.set_path(str(text))
    cal.resume.setChecked(False)
    cal.set_settings(**{"method": "adam", "preset": "fast", "seqs": 4, "seq_len": 32, "steps": 3, "batch": 2, **kw})
    return cal


def test_calibration_runs_to_the_end_and_is_undoable(window, qtbot, tiny_text_file):
    p = window.project
    p.edit_blocks([0, 2], "replicas", 2)
    before = p.config
    cal = _setup(window, tiny_text_file)
    with qtbot.waitSignal(cal.finished, timeout=TIMEOUT_MS) as sig:
        assert cal.start()
        assert p.locked
    assert sig.args == ["done"], cal.last_message
    assert not p.locked
    after = p.config
    assert after is not before  # replaced through one undoable command
    assert all(b.calibration and b.calibration["steps"] == 3 for b in after.blocks)
    assert len(cal.losses) == 9  # 3 blocks x 3 Adam steps, streamed from the worker
    assert after.tensors and any(k.startswith("b0.r1.") for k in after.tensors)
    m = window.layers.model
    assert m.index(0, COL["loss_before"]).data() not in ("", None)
    assert "Calibrated 3 blocks" in cal.summary.text()
    assert p.undo_stack.undoText().startswith("Calibrate (adam")
    p.undo_stack.undo()
    assert p.config is before and not any(b.calibration for b in before.blocks)
    p.undo_stack.redo()
    assert p.config is after
    # a structural edit drops the block's calibrated tensors; undo puts them back
    n = len(after.tensors)
    p.edit_blocks([0], "replicas", 3)
    assert not any(k.startswith("b0.") for k in after.tensors) and after.blocks[0].calibration is None
    p.undo_stack.undo()
    assert len(after.tensors) == n and after.blocks[0].calibration is not None


def test_calibration_can_be_cancelled(window, qtbot, tiny_text_file):
    p = window.project
    before = p.config.to_dict()
    cal = _setup(window, tiny_text_file, steps=5000)
    cal.start()
    qtbot.waitUntil(lambda: len(cal.losses) > 0, timeout=TIMEOUT_MS)
    with qtbot.waitSignal(cal.finished, timeout=TIMEOUT_MS) as sig:
        cal.bar.cancel.click()
    assert sig.args == ["cancelled"]
    assert p.config.to_dict() == before and p.undo_stack.count() == 0
    assert not p.locked and cal.run_button.isEnabled()
    assert "cancelled" in cal.last_message


def test_missing_calibration_text_is_a_message(window, qtbot, tmp_path):
    cal = _setup(window, tmp_path / "nope.txt")
    with qtbot.waitSignal(cal.finished, timeout=TIMEOUT_MS) as sig:
        cal.start()
    assert sig.args == ["failed"]
    assert "no such text file" in window.banner.text()
    assert not window.project.locked


def test_event_loop_keeps_turning_while_calibrating(window, qtbot, tiny_text_file, monkeypatch):
    """Decision 15: the work runs off the GUI thread and no event-loop gap exceeds 1 s."""
    import dupstudio.core.calibrate as core_cal

    threads = []
    real = core_cal.calibrate

    def spy(*a, **k):
        threads.append(threading.get_ident())
        return real(*a, **k)

    monkeypatch.setattr(core_cal, "calibrate", spy)
    window.project.edit_blocks([0, 1, 2], "replicas", 2)
    cal = _setup(window, tiny_text_file, seqs=8, seq_len=64, steps=25, batch=4)
    ticks = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    t0 = time.perf_counter()
    with qtbot.waitSignal(cal.finished, timeout=TIMEOUT_MS) as sig:
        cal.start()
    timer.stop()
    elapsed = time.perf_counter() - t0
    assert sig.args == ["done"]
    assert threads and threads[0] != threading.get_ident() and threads[0] == window.runner.thread_id
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    stall = max(gaps)
    print(f"\ncalibration {elapsed:.2f} s on the worker; {len(ticks)} timer ticks; "
          f"max event-loop stall {stall * 1000:.1f} ms")
    assert elapsed > 0.5 and len(ticks) > 10
    assert stall < 1.0
