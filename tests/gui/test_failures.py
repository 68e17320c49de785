"""A failed action leaves the window as it was and says so once; the next success clears it
(failed model opens, stale error banners, messages in programmer notation, quitting)."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("PySide6")

from dupstudio.gui.text import fmt_ms, fmt_si, user_message  # noqa: E402

TIMEOUT_MS = 60_000


def _fake_gguf(tmp_path):
    f = tmp_path / "fake.gguf"
    f.write_bytes(b"oNo0" + b"\\0" * 60)
    return f


def _not_a_model(tmp_path):
    d = tmp_path / "not-a-model"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    return d


@pytest.mark.parametrize("kind", ["folder", "gguf", "hub"])
def test_a_failed_open_keeps_the_working_model(window, qtbot, tmp_path, monkeypatch, tiny_text_file, kind):
    w, p = window, window.project
    p.edit_blocks([1], "replicas", 2)
    w.project.undo_stack.setClean()  # no "discard?" question in the way
    loaded, cfg, desc, count = p.loaded, p.config, w.description, p.undo_stack.count()
    title = w.windowTitle()
    if kind == "folder":
        source = str(_not_a_model(tmp_path))
    elif kind == "gguf":
        source = str(_fake_gguf(tmp_path))
    else:  # an unreachable hub id: the hub library fails as it does offline
        import mlx_lm.utils

        def offline(*a, **k):
            raise OSError("Got: ConnectError: [Errno -2] Name or service not known An error happened while "
                          "trying to locate the files on the Hub. Please check your internet connection and "
                          "try again.")

        monkeypatch.setattr(mlx_lm.utils, "_download", offline)
        source = "nosuch-org/nosuch-model"
    with qtbot.waitSignal(w.load_failed, timeout=TIMEOUT_MS):
        assert w.load_model(source)
        assert w.panel.fields["blocks"].text() == "3"  # the summary stays while the new one opens
    # everything as it was
    assert p.loaded is loaded and p.config is cfg and w.description is desc
    assert p.undo_stack.count() == count and p.config.blocks[1].replicas == 2
    assert w.windowTitle() == title
    assert w.panel.fields["blocks"].text() == "3" and w.panel.loading.isHidden()
    assert w.layers.model.rowCount() == 3 and w.distributions.heat_data.shape == (7, 3)
    assert w.open_folder_action.isEnabled() and not w.busy
    # the error, once: in the banner, readable
    text = w.banner.text()
    assert w.banner.isVisible() and "unchanged" in text
    assert "b'" not in text and "Error:" not in text and text.count("hub") <= 2
    if kind == "gguf":
        assert "“oNo0”" in text
    if kind == "hub":
        assert "could not be reached" in text and "ConnectError" not in text
    reason = {"folder": "not a model folder", "gguf": "not a GGUF", "hub": "could not be reached"}[kind]
    assert reason in text and w.status_text().startswith("Could not open") and reason not in w.status_text()
    # the old model still works: generation streams text
    g = w.generation
    g.max_tokens.setValue(4)
    g.side.setChecked(False)
    with qtbot.waitSignal(g.finished, timeout=TIMEOUT_MS) as sig:
        assert g.start()
    assert sig.args == ["done"] and g.text("config")
    # ... and that success took the stale error down
    assert not w.banner.isVisible() and w.error_message is None


def test_the_error_banner_goes_after_the_next_success(window, qtbot, tmp_path, tiny_text_file):
    w, ev = window, window.evaluation
    ev.windows.setValue(2)
    ev.ctx.setValue(32)
    ev.text.set_path(str(tmp_path / "missing.txt"))
    with qtbot.waitSignal(ev.finished, timeout=TIMEOUT_MS) as sig:
        ev.start(full_precision=True)
    assert sig.args == ["failed"] and w.banner.isVisible() and w.status_text().startswith("Error")
    ev.text.set_path(str(tiny_text_file))
    with qtbot.waitSignal(ev.finished, timeout=TIMEOUT_MS) as sig:
        ev.start(full_precision=True)
    assert sig.args == ["done"]
    assert not w.banner.isVisible() and not w.status_text().startswith("Error")
    # a failed edit's message goes too once an edit succeeds
    w.show_error("something earlier failed")
    w.project.edit_blocks([0], "replicas", 2)
    assert not w.banner.isVisible()


def test_messages_are_written_for_people():
    assert user_message("x.gguf: not a GGUF file (it starts with b'oNo0', a GGUF file starts with b'GGUF')") == \
        "x.gguf: not a GGUF file (it starts with “oNo0”, a GGUF file starts with “GGUF”)"
    hub = user_message("a/b: no such file or folder, and could not fetch it from the Hugging Face hub "
                       "(LocalEntryNotFoundError: Got: ConnectError: [Errno -2] Name or service not known "
                       "An error happened. Please check your internet connection and try again.)")
    assert hub == ("a/b: no such file or folder, and could not fetch it from the Hugging Face hub: "
                   "the hub could not be reached; check the network connection")
    assert user_message("It broke. It broke. Then more.") == "It broke. Then more."
    assert fmt_si(2.28407e9, "FLOP/s") == "2.28 GFLOP/s" and fmt_ms(193.2) == "193 ms" and fmt_ms(4.4) == "4.40 ms"


def test_no_jargon_in_the_window(window):
    """No "decision N", no bytes literals, no raw field names in labels, titles and tooltips."""
    from PySide6.QtWidgets import QAbstractButton, QGroupBox, QLabel

    w = window
    texts = []
    for cls in (QLabel, QGroupBox, QAbstractButton):
        for wid in w.findChildren(cls):
            texts.append(wid.text() if not isinstance(wid, QGroupBox) else wid.title())
            texts.append(wid.toolTip())
    for a in w.findChildren(type(w.save_action)):
        texts += [a.text(), a.toolTip(), a.statusTip()]
    m = w.layers.model
    texts += [str(m.headerData(c, 1, 3) or "") for c in range(m.columnCount())]  # Qt.ToolTipRole = 3
    joined = "\\n".join(t for t in texts if t)
    for bad in ("decision", "b'", "residual_gain", "group_size", "load_or_measure", "_tflops", "bandwidth_gbs"):
        assert bad not in joined, bad


def test_strategies_have_descriptions(window):
    from dupstudio.core import quant as Q
    from dupstudio.gui.panels.layers import COL
    from dupstudio.gui.strategies import STRATEGY_HELP

    assert set(Q.STRATEGIES) <= set(STRATEGY_HELP)
    view, m = window.layers.view, window.layers.model
    ed = view.itemDelegate().createEditor(view.viewport(), None, m.index(0, COL["strategy"]))
    from PySide6.QtCore import Qt

    tips = [ed.itemData(i, Qt.ToolTipRole) for i in range(ed.count())]
    assert all(t and len(t) > 20 for t in tips)
    d = window.distributions.strategy
    assert all(d.itemData(i, Qt.ToolTipRole) for i in range(d.count()))


def test_quitting_prints_nothing(tmp_path, tiny_model_dir):
    """A window closed with unsaved edits (answered "discard") quits without a traceback."""
    script = textwrap.dedent(f"""
        import sys
        from PySide6.QtCore import QSettings, QTimer
        from PySide6.QtWidgets import QApplication
        app = QApplication(sys.argv)
        from dupstudio.gui.main_window import MainWindow
        w = MainWindow({str(tiny_model_dir)!r}, settings=QSettings({str(tmp_path / "s.ini")!r}, QSettings.IniFormat))
        w.confirm_discard = lambda: "discard"
        w.show()
        def edit_then_quit():
            if w.description is None:
                QTimer.singleShot(50, edit_then_quit)
                return
            w.project.edit_blocks([0], "replicas", 2)
            w.close()
        QTimer.singleShot(50, edit_then_quit)
        code = app.exec()
        w.shutdown()
        print("quit", code)
    """)
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and "quit 0" in r.stdout, r.stderr
    assert "Traceback" not in r.stderr and "RuntimeError" not in r.stderr, r.stderr


def test_new_configuration_dialog_describes_its_choices(window):
    from PySide6.QtCore import Qt

    from dupstudio.gui.main_window import NewConfigDialog

    dlg = NewConfigDialog(window.project.shape, window)
    for combo in (dlg.strategy, dlg.mode, dlg.init):
        assert all(combo.itemData(i, Qt.ToolTipRole) for i in range(combo.count()))
    dlg.close()
