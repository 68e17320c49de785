"""GUI test fixtures: an isolated QSettings location, a main window on the tiny model, texts."""
import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import QCoreApplication, QSettings  # noqa: E402

TIMEOUT_MS = 60_000


@pytest.fixture(autouse=True, scope="session")
def _isolated_qsettings(tmp_path_factory):
    """No test reads or writes the user's settings: every QSettings scope points at a temp folder
    and the organisation name is the tests' own."""
    d = tmp_path_factory.mktemp("qsettings")
    for fmt in (QSettings.NativeFormat, QSettings.IniFormat):
        for scope in (QSettings.UserScope, QSettings.SystemScope):
            QSettings.setPath(fmt, scope, str(d))
    QCoreApplication.setOrganizationName("dupstudio-tests")
    QCoreApplication.setApplicationName("dupstudio-tests")
    yield d


@pytest.fixture
def settings(tmp_path):
    return QSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat)


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory):
    from dupstudio.core.testing import tiny_text

    p = tmp_path_factory.mktemp("texts") / "tiny.txt"
    p.write_text(tiny_text(40000))
    return p


@pytest.fixture
def make_window(qtbot, settings):
    """``make_window(model=None, load=True)``: a shown MainWindow (tiny model unless told), waited
    until the model is open. Dialogs are replaced by answers (tests never block)."""
    from dupstudio.gui.main_window import MainWindow

    made = []

    def make(model=None, *, load=True, autoload=True, wait_metrics=True):
        w = MainWindow(str(model) if model is not None else None, autoload=autoload and load, settings=settings)
        w.confirm_discard = lambda: "discard"
        w.ask_open_path = lambda *a, **k: None
        w.ask_save_path = lambda *a, **k: None
        w.ask_text_file = lambda *a, **k: None
        w.ask_directory = lambda *a, **k: None
        qtbot.addWidget(w)
        made.append(w)
        w.resize(1200, 800)
        w.show()
        if load and autoload:
            qtbot.waitUntil(lambda: w.description is not None or w.error_message is not None, timeout=TIMEOUT_MS)
            assert w.error_message is None, w.error_message
            if wait_metrics:
                qtbot.waitUntil(w.metrics_idle, timeout=TIMEOUT_MS)
        return w

    yield make
    for w in made:
        w.project.undo_stack.setClean()
        w.shutdown()
    # collect the closed windows here, on the GUI thread: left to a later collection they can be
    # destroyed on whichever thread triggers it (a worker loading the next test's model), which
    # crashed or hung Qt now and then
    import gc

    made.clear()
    gc.collect()


@pytest.fixture
def window(make_window, tiny_model_dir):
    return make_window(tiny_model_dir)
