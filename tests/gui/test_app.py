"""The main window opens a model on the worker thread and shows its summary (pytest-qt, offscreen)."""
import threading

import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl  # noqa: E402
from PySide6.QtGui import QDropEvent  # noqa: E402

from dupstudio.gui.main_window import TABS, MainWindow  # noqa: E402

TIMEOUT_MS = 60_000


def test_window_shows_tiny_model_summary(make_window, qtbot, tiny_model_dir):
    w = make_window(tiny_model_dir, load=False)
    assert w.windowTitle() == "dupstudio"
    w.load_model(str(tiny_model_dir))
    qtbot.waitUntil(lambda: w.description is not None or w.error_message is not None, timeout=TIMEOUT_MS)
    assert w.error_message is None
    assert not w.busy
    f = w.panel.fields
    assert f["blocks"].text() == "3"
    assert f["architecture"].text() == "llama"
    assert f["hidden"].text() == "256"
    assert f["parameters"].text().startswith("1,869,568")
    assert "3 blocks" in w.panel.title.text()
    sizes = w.panel.sizes
    assert [sizes.item(r, 0).text() for r in range(sizes.rowCount())] == [
        "16 bits (float16)", "4 bits", "3 bits", "2 bits"]
    assert sizes.item(3, 2).text() == "2.50"  # 2-bit g64: 2 bits of code + 32 bits of scale/bias per 64
    assert w.panel.matrices.rowCount() == 7
    assert not w.banner.isVisible()
    assert w.status_text().startswith("Loaded llama model: 3 blocks")
    assert w.windowTitle() == f"untitled — {tiny_model_dir.name} — dupstudio"
    assert [w.tabs.tabText(i).lower() for i in range(w.tabs.count())] == list(TABS)
    # a fresh 2-bit g64 configuration of the loaded model, K = 1 everywhere
    assert w.project.num_blocks == 3 and w.layers.model.rowCount() == 3
    assert w.totals.values["bits_per_weight"] == pytest.approx(2.5)
    assert str(tiny_model_dir) in w._recent("recent/models")


def test_invalid_folder_shows_error_in_window(make_window, qtbot, tmp_path):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "notes.txt").write_text("hello")
    w = make_window(load=False)
    with qtbot.waitSignal(w.load_failed, timeout=TIMEOUT_MS) as sig:
        w.load_model(str(bad))
    message = sig.args[0]
    assert str(bad) in message and "not a model folder" in message
    assert w.isVisible()
    assert w.banner.isVisible() and str(bad) in w.banner.text()
    assert w.panel.fields["blocks"].text() == "—"
    assert w.description is None and not w.busy
    assert w.status_text().startswith("Could not open")
    assert "not a model folder" not in w.status_text()  # the reason is shown once, in the banner


def test_jobs_run_off_the_gui_thread(make_window, qtbot):
    w = make_window(load=False)
    out = {}
    w.run_job(lambda progress, cancel: threading.get_ident(), lambda r: out.setdefault("tid", r))
    qtbot.waitUntil(lambda: "tid" in out, timeout=TIMEOUT_MS)
    assert out["tid"] != threading.get_ident()
    assert out["tid"] == w.runner.thread_id
    # the same single worker thread runs every job (all MLX work on one thread)
    w.run_job(lambda progress, cancel: threading.get_ident(), lambda r: out.setdefault("tid2", r))
    qtbot.waitUntil(lambda: "tid2" in out, timeout=TIMEOUT_MS)
    assert out["tid2"] == out["tid"]


def test_a_failing_job_becomes_a_message_not_a_crash(make_window, qtbot):
    w = make_window(load=False)

    def boom(progress, cancel):
        raise ZeroDivisionError("no")

    with qtbot.waitSignal(w.error_shown, timeout=TIMEOUT_MS) as sig:
        w.run_job(boom, lambda r: None)
    assert "ZeroDivisionError" in sig.args[0]
    assert w.banner.isVisible()
    out = {}
    w.run_job(lambda p, c: 42, lambda r: out.setdefault("r", r))  # the worker still runs
    qtbot.waitUntil(lambda: "r" in out, timeout=TIMEOUT_MS)


def test_window_can_open_another_model_after_an_error(make_window, qtbot, tmp_path, tiny_model_dir):
    w = make_window(tmp_path / "missing", load=False)
    w.load_model(str(tmp_path / "missing"))
    qtbot.waitUntil(lambda: w.error_message is not None, timeout=TIMEOUT_MS)
    assert "no such file or folder" in w.error_message
    w.load_model(str(tiny_model_dir))
    qtbot.waitUntil(lambda: w.description is not None, timeout=TIMEOUT_MS)
    assert w.panel.fields["blocks"].text() == "3"
    assert not w.banner.isVisible()


def test_first_start_opens_the_default_model_then_the_last_one(qtbot, settings, monkeypatch, tiny_model_dir):
    asked = []
    monkeypatch.setattr(MainWindow, "load_model", lambda self, source=None: asked.append(source))
    w = MainWindow(None, settings=settings)
    qtbot.addWidget(w)
    assert asked == [None]  # no argument, nothing remembered: the default model
    w.shutdown()
    settings.setValue("model/last", str(tiny_model_dir))
    w2 = MainWindow(None, settings=settings)
    qtbot.addWidget(w2)
    assert asked == [None, str(tiny_model_dir)]
    w2.shutdown()


def test_dropping_a_model_folder_opens_it(make_window, qtbot, tiny_model_dir):
    w = make_window(load=False)
    md = QMimeData()
    md.setUrls([QUrl.fromLocalFile(str(tiny_model_dir))])
    ev = QDropEvent(QPointF(10, 10), Qt.CopyAction, md, Qt.LeftButton, Qt.NoModifier)
    w.dropEvent(ev)
    qtbot.waitUntil(lambda: w.description is not None, timeout=TIMEOUT_MS)
    assert w.panel.fields["blocks"].text() == "3"


def test_geometry_and_settings_are_remembered(make_window, qtbot, settings):
    w = make_window(load=False)
    w.resize(640, 480)  # within the offscreen screen (800 × 600): restoreGeometry clamps to it
    w.tabs.setCurrentIndex(TABS.index("roofline"))
    size = (w.width(), w.height())  # the minimum size may widen it
    assert size != (1400, 900)
    w.shutdown()
    assert settings.value("window/geometry") is not None
    assert int(settings.value("window/tab")) == TABS.index("roofline")
    w2 = MainWindow(autoload=False, settings=settings)
    qtbot.addWidget(w2)
    try:
        assert w2.tabs.currentIndex() == TABS.index("roofline")
        assert w2.height() == size[1]  # not the default 900 (offscreen clamps widths to its 800-px screen)
    finally:
        w2.shutdown()
