"""Help ▸ User guide and Keyboard shortcuts, Recent models, the dark palette."""
import pytest

pytest.importorskip("PySide6")

from PySide6.QtGui import QKeySequence, QPalette  # noqa: E402

from dupstudio.gui.main_window import MainWindow  # noqa: E402

TIMEOUT_MS = 60_000


def test_user_guide_is_a_page_in_the_app(window, qtbot):
    from dupstudio.gui.help import guide_path

    assert guide_path() is not None and guide_path().name == "user-guide.md"
    assert window.guide_action.shortcut() == QKeySequence(QKeySequence.HelpContents)
    window.guide_action.trigger()
    g = window._guide
    assert g.isVisible() and not g.isModal()
    heads = g.headings()
    for tab in ("The Model tab", "The Layers tab", "The Distributions tab", "The Calibration tab",
                "The Evaluation tab", "The Generation tab", "The Roofline tab", "Keyboard shortcuts"):
        assert tab in heads
    text = g.browser.toPlainText()
    assert "decision" not in text.lower() and "Measure now" in text
    g.find.setText("End-to-end KL steps")
    g._find_next()
    assert g.browser.textCursor().selectedText() == "End-to-end KL steps"
    g.close()


def test_shortcuts_are_listed(window):
    dlg = window.show_shortcuts()
    keys = dlg.keys()
    assert keys["Save configuration"] == QKeySequence(QKeySequence.Save).toString(QKeySequence.NativeText)
    assert "Ctrl+Z" in keys["Undo"] and "Ctrl+1" in keys["Model"]
    assert keys["Copy the selected rows (tab-separated)"] == "Ctrl+C"
    assert keys["User guide"] == QKeySequence(QKeySequence.HelpContents).toString(QKeySequence.NativeText)
    dlg.close()


def test_recent_models_menu_works(make_window, qtbot, tiny_model_dir):
    w = make_window(load=False)
    titles = [a.text() for a in w.recent_models_menu.actions()]
    assert titles == ["(none yet)"] and w.panel.recent.item(0).text() == "(none yet)"
    with qtbot.waitSignal(w.model_loaded, timeout=TIMEOUT_MS):
        w.load_model(str(tiny_model_dir))
    acts = [a for a in w.recent_models_menu.actions() if not a.isSeparator()]
    assert acts[0].toolTip() == str(tiny_model_dir) and acts[-1].text() == "Clear this list"
    assert w.panel.recent.item(0).data(256) == str(tiny_model_dir)  # Qt.UserRole
    # the menu entry opens the model again
    w.project.undo_stack.setClean()
    with qtbot.waitSignal(w.model_loaded, timeout=TIMEOUT_MS):
        acts[0].trigger()
    # the default model is named, not shown as "default"
    assert MainWindow.recent_model_text("default").startswith("Default model")
    [a for a in w.recent_models_menu.actions() if a.text() == "Clear this list"][0].trigger()
    assert [a.text() for a in w.recent_models_menu.actions()] == ["(none yet)"]


def test_windows_that_do_not_remember_models_leave_recent_alone(qtbot, settings, tiny_model_dir):
    w = MainWindow(str(tiny_model_dir), settings=settings, remember_models=False)
    qtbot.addWidget(w)
    try:
        qtbot.waitUntil(lambda: w.description is not None, timeout=TIMEOUT_MS)
        assert w._recent("recent/models") == [] and not settings.value("model/last")
    finally:
        w.shutdown()


def test_self_test_does_not_record_its_temporary_model(qtbot):
    from dupstudio.gui.main_window import default_settings
    from dupstudio.selftest import run_self_test

    before = default_settings().value("recent/models", [])
    assert run_self_test() == 0
    after = default_settings().value("recent/models", [])
    assert after == before and "selftest" not in str(after)


def test_dark_palette_follows_the_scheme(window, qtbot, make_window):
    from PySide6.QtWidgets import QApplication

    from dupstudio.gui import theme

    app = QApplication.instance()
    light_bg = window.roofline.roof_plot.backgroundBrush().color().name()
    try:
        theme.switch(app, dark=True)
        assert theme.is_dark()
        assert app.palette().color(QPalette.Window).lightness() < 80
        # the open window restyles itself; a new one starts dark
        dark_bg = window.roofline.roof_plot.backgroundBrush().color().name()
        assert dark_bg != light_bg and window.roofline.roof_plot.backgroundBrush().color().lightness() < 80
        assert window.layers.hint.styleSheet() == theme.muted_css()
        window.show_error("dark banner")
        assert theme.banner_colors("error")[0] in window.banner.styleSheet()
    finally:
        theme.switch(app, dark=False)
    assert not theme.is_dark()
    assert window.roofline.roof_plot.backgroundBrush().color().name() == light_bg
    assert app.palette().color(QPalette.Window).lightness() > 150
