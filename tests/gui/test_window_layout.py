"""The window fits a 1280 × 760 screen with its docks open, and remembers their layout."""
import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import Qt  # noqa: E402

from dupstudio.gui.main_window import TABS, MainWindow  # noqa: E402


def test_docks_fit_a_small_screen(window, qtbot):
    w = window
    w.sensitivity_dock.show()
    w.history.show()
    for i in range(len(TABS)):
        w.tabs.setCurrentIndex(i)
        qtbot.wait(10)
        hint = w.minimumSizeHint()
        assert hint.width() <= 1280 and hint.height() <= 760, (TABS[i], hint)
    # the two docks share one column (tabified), not two
    assert w.tabifiedDockWidgets(w.history) == [w.sensitivity_dock]
    # opened for the first time: wide enough to read
    assert w.history.widget().minimumWidth() >= 240
    # a narrow window scrolls a tab's contents instead of growing: the pages sit in scroll areas
    from PySide6.QtWidgets import QScrollArea

    assert all(isinstance(w.tabs.widget(i), QScrollArea) for i in range(w.tabs.count()))
    assert w.tabs.currentWidget() is w.tabs.page(w.tabs.currentIndex())
    w.tabs.setCurrentWidget(w.layers)
    assert w.tabs.currentIndex() == TABS.index("layers") and w.tabs.currentWidget() is w.layers
    # the totals strip wraps rather than widening the window
    assert w.totals.minimumSizeHint().width() < 400 and "bits/weight" in w.totals.text()


def test_the_window_starts_within_the_screen(make_window):
    w = make_window(load=False)
    avail = w.screen().availableGeometry()
    w.resize(avail.width() + 500, avail.height() + 500)
    w.fit_to_screen()
    assert w.width() <= avail.width() and w.height() <= avail.height()


def test_dock_layout_is_remembered(make_window, qtbot, settings):
    w = make_window(load=False)
    w.resize(760, 560)
    w.sensitivity_dock.show()
    qtbot.wait(20)
    w.resizeDocks([w.sensitivity_dock], [330], Qt.Horizontal)
    qtbot.wait(20)
    width = w.sensitivity_dock.width()
    w.shutdown()
    assert settings.value("window/state") is not None
    w2 = MainWindow(autoload=False, settings=settings)
    qtbot.addWidget(w2)
    try:
        w2.show()
        qtbot.wait(50)
        assert w2.sensitivity_dock.isVisible() and not w2.history.isVisible()
        assert abs(w2.sensitivity_dock.width() - width) <= 12
    finally:
        w2.shutdown()
    # a state saved by an older layout is ignored rather than misapplied
    settings.setValue("window/state", w2.saveState(1))
    w3 = MainWindow(autoload=False, settings=settings)
    qtbot.addWidget(w3)
    try:
        assert not w3.sensitivity_dock.isVisible()
    finally:
        w3.shutdown()


def test_pages_need_no_vertical_scrolling_at_760_pixels(window):
    """A page's scroll area asks for the page's minimum height (not its preferred one, which a
    page with wrapped text would report), and every page's minimum fits a 1280 × 760 window."""
    from PySide6.QtWidgets import QScrollArea

    w = window
    w.roofline.refresh()
    for i in range(w.tabs.count()):
        holder = w.tabs.widget(i).widget()
        assert isinstance(w.tabs.widget(i), QScrollArea)
        h = holder.heightForWidth(1200)
        assert h == holder.minimumSizeHint().height() <= 600, (TABS[i], h)


def test_every_table_copies_its_rows(window, qtbot):
    """Ctrl+C on any table of the window copies the selected rows as tab-separated text."""
    from PySide6.QtGui import QGuiApplication, QKeySequence
    from PySide6.QtWidgets import QTableView

    views = [v for v in window.findChildren(QTableView) if v.objectName() in
             ("layerTable", "evalTable", "rooflineTable")] + [window.sensitivity.table]
    assert len(views) == 4
    for v in views:
        acts = [a for a in v.actions() if a.shortcut() == QKeySequence(QKeySequence.Copy)]
        assert acts, v.objectName()
    window.roofline.set_mode("profile")
    t = window.roofline.table
    t.selectRow(0)
    [a for a in t.actions() if a.shortcut() == QKeySequence(QKeySequence.Copy)][0].trigger()
    lines = QGuiApplication.clipboard().text().strip("\n").split("\n")
    assert lines[0].startswith("Hardware\tConfiguration") and len(lines) == 2
