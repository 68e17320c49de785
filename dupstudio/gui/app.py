"""The desktop application: ``run_gui()`` opens the main window.

All MLX work runs on one worker thread (:class:`dupstudio.gui.worker.JobRunner`); the GUI thread
only edits the configuration and draws. See :mod:`dupstudio.gui.main_window` for the window.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from dupstudio.gui.main_window import APPLICATION, ORGANIZATION, MainWindow  # noqa: F401 (re-export)
from dupstudio.gui.worker import JobRunner  # noqa: F401 (re-export)


def run_gui(argv: Optional[list[str]] = None) -> int:
    """Open the main window; ``argv`` may name a model (folder, .gguf, hub id) and a configuration."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="dupstudio", add_help=False)
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--config", default=None)
    args, qt_args = p.parse_known_args(argv)
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([sys.argv[0] if sys.argv else "dupstudio", *qt_args])
    app.setOrganizationName(ORGANIZATION)
    app.setApplicationName(APPLICATION)
    app.setApplicationDisplayName("dupstudio")
    from dupstudio.gui import theme

    theme.apply(app)  # light or dark, as the desktop is set
    theme.follow_system(app)
    win = MainWindow(args.model)
    if args.config:
        win.model_loaded.connect(lambda _d: win.open_configuration(args.config))
    win.show()
    code = app.exec()
    win.shutdown()
    return int(code)
