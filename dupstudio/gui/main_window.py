"""The main window: tabs for the model, the layer table, distributions, calibration, evaluation,
generation and the roofline; a totals strip; configuration files; settings; drag and drop.

Threading: every MLX call runs on ``self.runner`` (one worker thread, :mod:`dupstudio.gui.worker`);
this thread only edits the configuration's block specs and draws.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from PySide6.QtCore import QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDockWidget,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QUndoView,
    QVBoxLayout,
    QWidget,
)

from dupstudio.core.jobs import DupstudioError
from dupstudio.gui import tasks, theme
from dupstudio.gui.panels.calibration import CalibrationPanel
from dupstudio.gui.panels.distributions import DistributionsPanel
from dupstudio.gui.panels.evaluation import EvaluationPanel
from dupstudio.gui.panels.generation import GenerationPanel
from dupstudio.gui.panels.layers import LayersPanel, TotalsBar
from dupstudio.gui.panels.model import ModelPanel
from dupstudio.gui.panels.roofline import RooflinePanel
from dupstudio.gui.panels.sensitivity import SensitivityPanel
from dupstudio.gui.project import Project, baseline_config, common_group_sizes, snapshot
from dupstudio.gui.text import user_message
from dupstudio.gui.widgets import Banner, PathEdit, ScrollingTabs, fmt_seconds
from dupstudio.gui.worker import BACKGROUND, JobRunner

ORGANIZATION = "dupstudio"
APPLICATION = "dupstudio"
MAX_RECENT = 8
STATE_VERSION = 2  # window/state written by an older layout is not restored
#: a dock's width the first time it opens (then the user's, remembered)
DOCK_WIDTHS = {"history": 300, "sensitivity": 440}
METRICS_CHUNK = 4
TABS = ("model", "layers", "distributions", "calibration", "evaluation", "generation", "roofline")


def _block_list(blocks: list) -> str:
    from dupstudio.gui.panels.calibration import describe_blocks

    return f"block{'s' if len(blocks) != 1 else ''} {describe_blocks(blocks)}"


def export_checks(cfg) -> dict:
    """What the export confirmation says about ``cfg``: replicated blocks grouped by K and mode,
    K = 1 blocks with β ≠ 1, and what is not calibrated (warnings)."""
    groups: dict = {}
    beta = []
    uncal = []
    for b in cfg.blocks:
        if b.replicas > 1:
            groups.setdefault((b.replicas, b.mode), []).append(b.index)
            if not b.calibration:
                uncal.append(b.index)
        elif float(b.residual_gain) != 1.0:
            beta.append(b.index)
    warnings = []
    if uncal:
        warnings.append(f"{len(uncal)} of {sum(len(v) for v in groups.values())} replicated blocks are not "
                        f"calibrated ({_block_list(uncal)}): their extra replicas keep their starting scales, "
                        "which usually makes the model worse, not better. Calibrate them first (Calibration tab).")
    elif not any(b.calibration for b in cfg.blocks):
        warnings.append("Nothing in this configuration is calibrated: the export holds round-to-nearest scales "
                        "only.")
    return {"groups": groups, "beta": beta, "uncalibrated": uncal, "warnings": warnings}


def export_preview_text(preview: dict) -> str:
    """The export confirmation: size, bits/weight, and how the folder loads, in a few lines (a
    summary of the replicated blocks, not one line per block)."""
    lines = [f"Size: {preview['bytes'] / 1e6:.1f} MB ({preview['bits_per_weight']:.3f} bits/weight in the "
             f"decoder blocks)"]
    checks = preview.get("checks") or {}
    if preview.get("trust_remote_code"):
        parts = [f"K = {k} ({mode}) on {_block_list(blocks)}"
                 for (k, mode), blocks in sorted(checks.get("groups", {}).items())]
        if checks.get("beta"):
            parts.append(f"β ≠ 1 on {_block_list(checks['beta'])}")
        if not parts and preview.get("reasons"):
            n = len(preview["reasons"])
            parts.append(str(preview["reasons"][0]) + (f" and {n - 1} more" if n > 1 else ""))
        lines.append("Loading needs --trust-remote-code (a small custom model file): " + "; ".join(parts) + ".")
    else:
        arch = preview.get("architecture") or "llama"
        lines.append(f"Loads as a standard mlx-lm {arch} model (no --trust-remote-code needed).")
    return "\n".join(lines)


def _scroll(widget: QWidget) -> QWidget:
    """``widget`` in a frameless scroll area: a dock narrower than its contents scrolls instead of
    widening the window."""
    from PySide6.QtWidgets import QFrame, QScrollArea

    from dupstudio.gui.widgets import _Page

    area = QScrollArea()
    area.setWidget(_Page(widget))
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.NoFrame)
    return area


def default_settings() -> QSettings:
    return QSettings(ORGANIZATION, APPLICATION)


def _finish_form(dialog, form, note: str, ok_text: str) -> None:
    """A settings dialog's tail: an optional grey note, then OK (named ``ok_text``) and Cancel."""
    if note:
        lab = QLabel(note)
        lab.setWordWrap(True)
        lab.setStyleSheet(theme.muted_css())
        form.addRow(lab)
    bb = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
    bb.button(QDialogButtonBox.Ok).setText(ok_text)
    bb.accepted.connect(dialog.accept)
    bb.rejected.connect(dialog.reject)
    form.addRow(bb)


class NewConfigDialog(QDialog):
    def __init__(self, shape: dict, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        from dupstudio.core import config as C
        from dupstudio.core import quant as Q

        self.setWindowTitle("New configuration")
        form = QFormLayout(self)
        self.bits = QComboBox()
        for b in C.SUPPORTED_BITS:
            self.bits.addItem(str(b), b)
        self.group = QComboBox()
        sizes = common_group_sizes(shape)
        for g in sizes:
            self.group.addItem(str(g), g)
        self.group.setCurrentIndex(max(0, self.group.findData(64)))
        self.strategy = QComboBox()
        for s in Q.STRATEGIES:
            self.strategy.addItem(s, s)
        self.replicas = QSpinBox()
        self.replicas.setRange(1, C.MAX_REPLICAS)
        self.mode = QComboBox()
        for m in C.MODES:
            self.mode.addItem(m, m)
        self.init = QComboBox()
        for i in C.INITS:
            self.init.addItem(i, i)
        from dupstudio.gui.strategies import add_tooltips

        for combo, kind in ((self.strategy, "strategy"), (self.mode, "mode"), (self.init, "init")):
            add_tooltips(combo, kind)
        form.addRow("Bits", self.bits)
        form.addRow("Group size", self.group)
        note = QLabel(f"(group sizes that divide every row of this model: {', '.join(map(str, sizes))})")
        note.setStyleSheet(theme.muted_css())
        form.addRow(note)
        form.addRow("Scale/zero strategy", self.strategy)
        form.addRow("Replicas K (every block)", self.replicas)
        form.addRow("Mode", self.mode)
        form.addRow("Replica init", self.init)
        bb = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        bb.accepted.connect(self.accept)
        bb.rejected.connect(self.reject)
        form.addRow(bb)

    def values(self) -> dict:
        return {"bits": self.bits.currentData(), "group_size": self.group.currentData(),
                "strategy": self.strategy.currentData(), "replicas": self.replicas.value(),
                "mode": self.mode.currentData(), "init": self.init.currentData()}


class SearchDialog(QDialog):
    """Budgets and calibration text of the budgeted search (Tools ▸ Search…)."""

    def __init__(self, text: str, note: str = "", parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Search configurations")
        form = QFormLayout(self)
        self.budget = QDoubleSpinBox()
        self.budget.setDecimals(3)
        self.budget.setRange(1.0, 16.0)
        self.budget.setSingleStep(0.05)
        self.budget.setValue(2.5)
        self.budget.setSuffix(" bits/weight")
        self.latency = QDoubleSpinBox()
        self.latency.setDecimals(3)
        self.latency.setRange(0.0, 1e6)
        self.latency.setSingleStep(0.1)
        self.latency.setSpecialValueText("none")
        self.latency.setSuffix(" ms/token")
        self.text = PathEdit("Choose a calibration text")
        if text:
            self.text.set_path(text)
        form.addRow("Size budget", self.budget)
        form.addRow("Latency budget", self.latency)
        form.addRow("Calibration text", self.text)
        _finish_form(self, form, note, "Search")

    def values(self) -> dict:
        lat = self.latency.value()
        return {"budget_bpw": self.budget.value(), "budget_latency_ms": lat if lat > 0 else None,
                "text": self.text.path()}


class SensitivityDialog(QDialog):
    """Calibration text, blocks, replica mode and KL windows of the per-block sensitivity
    (Tools ▸ Sensitivity…)."""

    def __init__(self, text: str, num_blocks: int, note: str = "", parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        from dupstudio.core.config import MODES

        self.setWindowTitle("Per-block sensitivity")
        form = QFormLayout(self)
        self.text = PathEdit("Choose a calibration text")
        if text:
            self.text.set_path(text)
        self.blocks = QLineEdit()
        self.blocks.setPlaceholderText(f"all {num_blocks} (or e.g. 0,5,10-12)")
        self.mode = QComboBox()
        for m in MODES:
            self.mode.addItem(m, m)
        self.replica = QCheckBox("calibrate a second replica of each block (K = 2)")
        self.replica.setChecked(True)
        self.replica.toggled.connect(self.mode.setEnabled)
        self.kl_windows = QSpinBox()
        self.kl_windows.setRange(1, 256)
        self.kl_windows.setValue(8)
        form.addRow("Calibration text", self.text)
        form.addRow("Blocks", self.blocks)
        form.addRow("", self.replica)
        form.addRow("Second replica mode", self.mode)
        form.addRow("KL windows", self.kl_windows)
        _finish_form(self, form, note, "Measure")

    def values(self) -> dict:
        return {"text": self.text.path(), "blocks": self.blocks.text().strip() or None,
                "mode": self.mode.currentData(), "with_replica": self.replica.isChecked(),
                "kl_windows": self.kl_windows.value()}


class MainWindow(QMainWindow):
    model_loaded = Signal(object)  # the description dict
    load_failed = Signal(str)
    config_saved = Signal(str)
    config_opened = Signal(str)
    config_failed = Signal(str)  # an open / save error
    error_shown = Signal(str)
    export_finished = Signal(str)  # "done", "cancelled" or "failed"
    search_finished = Signal(str)  # "done", "cancelled" or "failed"
    sensitivity_finished = Signal(str)  # "done", "cancelled" or "failed"

    def __init__(self, model: Optional[str] = None, *, autoload: bool = True,
                 settings: Optional[QSettings] = None, remember_models: bool = True) -> None:
        super().__init__()
        self.settings = settings if settings is not None else default_settings()
        self.setWindowTitle("dupstudio")
        self.resize(1400, 900)
        self.setAcceptDrops(True)
        self.description: Optional[dict] = None
        self.error_message: Optional[str] = None
        self._error_seq = 0  # bumps on every error shown
        self._error_at_start: dict = {}  # job id -> _error_seq when it started
        self.remember_models = remember_models  # False: opened models stay out of Recent models
        self._loading = False
        self._progress_status = None
        self._closing_after_save = False
        self._shut = False
        self._shown_once = False
        self._export_job = None
        self._search_job = None
        self._sensitivity_job = None
        self._sensitivity_model = None  # the LoadedModel the shown sensitivity belongs to

        self.project = Project(self)
        self.runner = JobRunner(self)
        self.build_cache = tasks.BuildCache()  # used by worker jobs only

        # ---------------------------------------------------------------- layout
        central = QWidget()
        lay = QVBoxLayout(central)
        lay.setContentsMargins(4, 4, 4, 0)
        lay.setSpacing(4)
        self.banner = Banner()
        lay.addWidget(self.banner)
        self.tabs = ScrollingTabs()
        self.tabs.setDocumentMode(True)
        lay.addWidget(self.tabs, 1)
        self.totals = TotalsBar(self.project)
        lay.addWidget(self.totals)
        self.setCentralWidget(central)

        self.panel = ModelPanel()  # kept as .panel: the model summary
        self.layers = LayersPanel(self.project)
        self.distributions = DistributionsPanel(self.project, self)
        self.calibration = CalibrationPanel(self.project, self)
        self.evaluation = EvaluationPanel(self.project, self)
        self.generation = GenerationPanel(self.project, self)
        self.roofline = RooflinePanel(self.project, self)
        for w, name in ((self.panel, "Model"), (self.layers, "Layers"), (self.distributions, "Distributions"),
                        (self.calibration, "Calibration"), (self.evaluation, "Evaluation"),
                        (self.generation, "Generation"), (self.roofline, "Roofline")):
            self.tabs.addTab(w, name)

        self.panel.open_folder.connect(self._choose_folder)
        self.panel.open_gguf.connect(self._choose_gguf)
        self.panel.open_default.connect(lambda: self.load_model(None))
        self.panel.open_source.connect(self.load_model)
        self.panel.open_recent.connect(self.load_model)
        self.layers.model.edit_failed.connect(self.show_error)
        self.layers.status.connect(self.show_status)
        self.layers.view.selectionModel().currentRowChanged.connect(
            lambda cur, _prev: cur.isValid() and self.distributions.show_block(cur.row()))
        self.layers.view.selectionModel().selectionChanged.connect(
            lambda *_: self.calibration.update_block_choice())
        self.layers.model.modelReset.connect(self.calibration.update_block_choice)
        self.calibration.update_block_choice()

        # ---------------------------------------------------------------- status bar
        self._status = QLabel("Ready")
        self._job_label = QLabel("")
        self._job_label.setStyleSheet(theme.muted_css())
        self._bar = QProgressBar()
        self._bar.setMaximumWidth(200)
        self._bar.setTextVisible(False)
        self._bar.hide()
        self._cancel = QPushButton("Cancel")
        self._cancel.setFlat(True)
        self._cancel.hide()
        self._cancel.clicked.connect(self.cancel_current)
        self.statusBar().addWidget(self._status, 1)
        self.statusBar().addPermanentWidget(self._job_label)
        self.statusBar().addPermanentWidget(self._bar)
        self.statusBar().addPermanentWidget(self._cancel)
        self.runner.job_started.connect(self._job_started)
        self.runner.job_finished.connect(self._job_finished)
        self.runner.job_progress.connect(self._job_progress)

        # ---------------------------------------------------------------- docks (right, tabified)
        self.history = QDockWidget("History", self)
        self.history.setObjectName("historyDock")
        undo_view = QUndoView(self.project.undo_stack)
        undo_view.setEmptyLabel("Opened (no edits yet)")
        undo_view.setMinimumWidth(240)  # room to read "Set K = 2 on 3 blocks" and the like
        undo_view.setWordWrap(True)
        self.history.setWidget(undo_view)
        self.addDockWidget(Qt.RightDockWidgetArea, self.history)
        self.history.hide()

        self.sensitivity = SensitivityPanel()
        self.sensitivity_dock = QDockWidget("Sensitivity", self)
        self.sensitivity_dock.setObjectName("sensitivityDock")
        self.sensitivity_dock.setWidget(_scroll(self.sensitivity))
        self.addDockWidget(Qt.RightDockWidgetArea, self.sensitivity_dock)
        self.tabifyDockWidget(self.history, self.sensitivity_dock)  # one column of the window, not two
        self.sensitivity_dock.hide()
        self.sensitivity.apply_requested.connect(self.apply_sensitivity)
        self.sensitivity.cancel_requested.connect(self.cancel_sensitivity)
        for dock, width in ((self.history, DOCK_WIDTHS["history"]), (self.sensitivity_dock, DOCK_WIDTHS["sensitivity"])):
            dock.visibilityChanged.connect(lambda shown, d=dock, w=width: shown and self._size_dock(d, w))

        self._build_menus()
        self.project.dirty_changed.connect(lambda _d: self._update_title())
        self.project.path_changed.connect(lambda _p: self._update_title())
        self.project.config_replaced.connect(self._config_replaced)
        self.project.blocks_changed.connect(self._schedule_metrics)
        self.project.model_changed.connect(self._sync_actions)
        self.project.busy_changed.connect(lambda _b: self._sync_actions())
        self.project.undo_stack.indexChanged.connect(lambda _i: self.clear_error())  # an edit succeeded
        self._metrics_pending: set = set()
        self._metrics_jobs: list = []
        self._metrics_timer = QTimer(self)
        self._metrics_timer.setSingleShot(True)
        self._metrics_timer.setInterval(150)
        self._metrics_timer.timeout.connect(self._submit_metrics)

        theme.on_change(self.apply_theme)
        self._restore_settings()
        if autoload:
            if model is None:
                last = self.settings.value("model/last", "")
                model = last if last and Path(str(last)).exists() else None
            self.load_model(model)

    # ================================================================== menus
    def _action(self, menu, text: str, slot: Callable, shortcut=None, tip: str = "") -> QAction:
        a = QAction(text, self)
        if shortcut is not None:
            if isinstance(shortcut, (list, tuple)):
                a.setShortcuts([QKeySequence(s) for s in shortcut])
            else:
                a.setShortcut(QKeySequence(shortcut))
        if tip:
            a.setStatusTip(tip)
        a.triggered.connect(lambda _checked=False: slot())
        menu.addAction(a)
        return a

    def _build_menus(self) -> None:
        mb = self.menuBar()
        m = mb.addMenu("&File")
        self.open_folder_action = self._action(m, "Open model &folder…", self._choose_folder, "Ctrl+Shift+O")
        self.open_gguf_action = self._action(m, "Open &GGUF file…", self._choose_gguf)
        self.open_hub_action = self._action(m, "Open from the &hub…", self._choose_hub)
        self.open_default_action = self._action(m, "Open the &default model", lambda: self.load_model(None))
        self.recent_models_menu = m.addMenu("Recent &models")
        m.addSeparator()
        self.new_config_action = self._action(m, "&New configuration…", self.new_configuration, QKeySequence.New)
        self.open_config_action = self._action(m, "&Open configuration…", self.open_configuration, QKeySequence.Open)
        self.recent_configs_menu = m.addMenu("Recent &configurations")
        self.save_action = self._action(m, "&Save configuration", self.save, QKeySequence.Save)
        self.save_as_action = self._action(m, "Save configuration &as…", self.save_as, "Ctrl+Shift+S")
        m.addSeparator()
        self.export_action = self._action(m, "&Export model…", self.export_model, "Ctrl+E",
                                          "Write the configured model as an mlx-lm model folder")
        self.export_action.setEnabled(False)
        m.addSeparator()
        self._action(m, "&Quit", self.close, QKeySequence.Quit)

        e = mb.addMenu("&Edit")
        self.undo_action = self.project.undo_stack.createUndoAction(self, "&Undo")
        self.undo_action.setShortcuts([QKeySequence("Ctrl+Z")])
        self.redo_action = self.project.undo_stack.createRedoAction(self, "&Redo")
        self.redo_action.setShortcuts([QKeySequence("Ctrl+Shift+Z"), QKeySequence("Ctrl+Y")])
        e.addAction(self.undo_action)
        e.addAction(self.redo_action)
        e.addSeparator()
        self._action(e, "Select all &blocks", lambda: (self.tabs.setCurrentWidget(self.layers),
                                                       self.layers.view.selectAll()))

        v = mb.addMenu("&View")
        for i, name in enumerate(TABS):
            self._action(v, f"&{name.capitalize()}", lambda i=i: self.tabs.setCurrentIndex(i), f"Ctrl+{i + 1}")
        v.addSeparator()
        v.addAction(self.history.toggleViewAction())
        v.addAction(self.sensitivity_dock.toggleViewAction())

        t = mb.addMenu("&Tools")
        self.search_action = self._action(t, "&Search…", self.search_configurations, None,
                                          "Choose per-block replicas within a size / latency budget")
        self.search_action.setEnabled(False)
        self.sensitivity_action = self._action(
            t, "Se&nsitivity…", self.run_sensitivity, None,
            "Per block: the KL when only that block is quantized, and the gain of a second replica")
        self.sensitivity_action.setEnabled(False)

        h = mb.addMenu("&Help")
        self.guide_action = self._action(h, "&User guide", self.show_user_guide, QKeySequence.HelpContents,
                                         "How to use each tab of the window")
        self.shortcuts_action = self._action(h, "&Keyboard shortcuts", self.show_shortcuts, None,
                                             "Every keyboard shortcut of the window")
        h.addSeparator()
        self._action(h, "&About dupstudio", self._about)
        self._refresh_recent_menus()

    # ================================================================== appearance
    def apply_theme(self, old: dict, new: dict) -> None:
        """The desktop switched between light and dark: restyle what was styled with the old colours
        (plots, muted notes, the banner, the totals strip)."""
        import pyqtgraph as pg
        from PySide6.QtWidgets import QLabel

        old_css = f"QLabel {{ color: {old['muted']}; }}"
        for lab in self.findChildren(QLabel):
            if lab.styleSheet() == old_css:
                lab.setStyleSheet(theme.muted_css())
        for plot in self.findChildren(pg.PlotWidget):
            plot.setBackground(new["plot_bg"])
            for side in ("left", "bottom"):
                ax = plot.getPlotItem().getAxis(side)
                ax.setPen(pg.mkPen(new["axis"]))
                ax.setTextPen(pg.mkPen(new["axis_text"]))
        if self.banner.isVisible():
            self.banner.show_message(self.banner.label.text(), self.banner.kind)
        self.totals.setStyleSheet(f"QWidget#totalsBar {{ background: {new['panel']}; border-top: 1px solid "
                                  f"{new['panel_border']}; }} QLabel {{ padding: 0 6px; }}")
        self.totals.refresh()
        self.layers.model.layoutChanged.emit()

    # ================================================================== help
    def show_user_guide(self) -> QDialog:
        """Help ▸ User guide: docs/user-guide.md rendered in a window of its own (not modal)."""
        from dupstudio.gui.help import GuideWindow

        if getattr(self, "_guide", None) is None:
            self._guide = GuideWindow(self)
        self._guide.show()
        self._guide.raise_()
        return self._guide

    def shortcut_rows(self) -> list:
        """(where, what, keys) for every action with a shortcut, menu by menu, plus the table keys."""
        rows = []

        def walk(menu, path):
            for a in menu.actions():
                if a.menu() is not None:
                    walk(a.menu(), path + [a.text().replace("&", "")])
                elif not a.isSeparator() and a.shortcuts():
                    keys = ", ".join(k.toString(QKeySequence.NativeText) for k in a.shortcuts())
                    rows.append((" ▸ ".join(path), a.text().replace("&", "").rstrip("…"), keys))

        for a in self.menuBar().actions():
            if a.menu() is not None:
                walk(a.menu(), [a.text().replace("&", "")])
        copy = QKeySequence(QKeySequence.Copy).toString(QKeySequence.NativeText)
        paste = QKeySequence(QKeySequence.Paste).toString(QKeySequence.NativeText)
        rows += [("Tables", "Copy the selected rows (tab-separated)", copy),
                 ("Layers table", "Paste the copied rows' settings onto the selected blocks", paste),
                 ("Layers table", "Edit the current cell", "F2 or double-click"),
                 ("Layers table", "Select several rows", "Shift-click, Ctrl-click")]
        return rows

    def show_shortcuts(self) -> QDialog:
        from dupstudio.gui.help import ShortcutsDialog

        dlg = ShortcutsDialog(self.shortcut_rows(), self)
        dlg.show()
        return dlg

    def _about(self) -> None:
        from dupstudio import __version__

        QMessageBox.about(self, "About dupstudio",
                          f"dupstudio {__version__}\n\nReplicate decoder blocks over shared 2-bit codes, "
                          "calibrate them, and see what it costs.\n\nHelp ▸ User guide (F1) explains each tab.")

    # ================================================================== dialogs (monkeypatched in tests)
    def start_dir(self) -> str:
        """Where file dialogs open: the folder last used, else the home folder (never the folder
        the app happens to run from, e.g. its install tree)."""
        last = str(self.settings.value("paths/last_dir", "") or "")
        if last and Path(last).is_dir():
            return last
        return str(Path.home())

    def ask_open_path(self, caption: str, filter: str) -> Optional[str]:
        f, _ = QFileDialog.getOpenFileName(self, caption, self.start_dir(), filter)
        if f:
            self.settings.setValue("paths/last_dir", str(Path(f).parent))
        return f or None

    def ask_save_path(self, caption: str, default_name: str, filter: str) -> Optional[str]:
        start = str(Path(self.start_dir()) / default_name)
        f, _ = QFileDialog.getSaveFileName(self, caption, start, filter)
        if f:
            self.settings.setValue("paths/last_dir", str(Path(f).parent))
        return f or None

    def ask_text_file(self, caption: str) -> Optional[str]:
        return self.ask_open_path(caption, "Text files (*.txt);;All files (*)")

    def ask_directory(self, caption: str) -> Optional[str]:
        d = QFileDialog.getExistingDirectory(self, caption, self.start_dir())
        if d:
            self.settings.setValue("paths/last_dir", str(Path(d).parent))
        return d or None

    def ask_export_dir(self, default_name: str) -> Optional[str]:
        """The folder to export into (a new one, or an existing empty one)."""
        start = str(Path(self.start_dir()) / default_name)
        d, _ = QFileDialog.getSaveFileName(self, "Export the model into a new folder", start, "Folders (*)",
                                           options=QFileDialog.DontConfirmOverwrite)
        if d:
            self.settings.setValue("paths/last_dir", str(Path(d).parent))
        return d or None

    def confirm_export(self, preview: dict) -> bool:
        warnings = (preview.get("checks") or {}).get("warnings") or []
        box = QMessageBox(QMessageBox.Warning if warnings else QMessageBox.Question, "Export the model",
                          export_preview_text(preview), QMessageBox.Ok | QMessageBox.Cancel, self)
        if warnings:
            box.setInformativeText("\n\n".join(warnings))
        box.button(QMessageBox.Ok).setText("Export anyway" if warnings else "Export")
        box.setDefaultButton(QMessageBox.Cancel if warnings else QMessageBox.Ok)
        return box.exec() == QMessageBox.Ok

    def ask_search_settings(self) -> Optional[dict]:
        """{"budget_bpw", "budget_latency_ms" (None: no latency budget), "text"} or None."""
        from dupstudio.gui.panels.calibration import default_calibration_text

        text = self.calibration.text.path() or str(default_calibration_text() or "")
        s = self.calibration.settings()
        note = (f"Calibration settings come from the Calibration tab ({s.method}, {s.steps} steps, "
                f"{s.seqs} × {s.seq_len} tokens); latency is predicted for "
                f"{self.roofline.search_profile_label()}. The result replaces the configuration "
                "(Ctrl+Z restores it).")
        dlg = SearchDialog(text, note, self)
        if dlg.exec() != QDialog.Accepted:
            return None
        return dlg.values()

    def ask_sensitivity_settings(self) -> Optional[dict]:
        """{"text", "blocks" (None: all), "mode", "with_replica", "kl_windows"} or None."""
        from dupstudio.gui.panels.calibration import default_calibration_text

        text = self.calibration.text.path() or str(default_calibration_text() or "")
        s = self.calibration.settings()
        note = (f"Only one block at a time is quantized ({self._sensitivity_base_text()}, as in the layer table); "
                "every other block stays float. With a second replica, each block is calibrated twice "
                f"(K = 1 and K = 2, settings from the Calibration tab: {s.method}, {s.steps} steps, "
                f"{s.seqs} × {s.seq_len} tokens) and the KL is measured three times; this takes a while on "
                "a large model. The configuration is not changed.")
        dlg = SensitivityDialog(text, self.project.num_blocks, note, self)
        if dlg.exec() != QDialog.Accepted:
            return None
        return dlg.values()

    def confirm_discard(self) -> str:
        """'save', 'discard' or 'cancel' for unsaved edits."""
        box = QMessageBox(QMessageBox.Warning, "Unsaved configuration",
                          f"The configuration “{self.project.display_name}” has unsaved changes.",
                          QMessageBox.Save | QMessageBox.Discard | QMessageBox.Cancel, self)
        box.setInformativeText("Save them first?")
        box.setDefaultButton(QMessageBox.Save)
        r = box.exec()
        return {QMessageBox.Save: "save", QMessageBox.Discard: "discard"}.get(r, "cancel")

    def _may_discard(self) -> bool:
        """True when it is fine to replace the configuration now (asks when it has unsaved edits)."""
        if not self.project.dirty:
            return True
        answer = self.confirm_discard()
        if answer == "discard":
            return True
        if answer == "save":
            self.save()
            self.show_status("Saving first; repeat the action once the configuration is saved.")
        return False

    # ================================================================== messages
    def show_error(self, message: str) -> None:
        """Show ``message`` once, in the banner (the status line names the failure briefly); it
        stays until dismissed or until the next action succeeds."""
        message = user_message(message)
        self.error_message = message
        self._error_seq += 1
        self.banner.show_message(message, "error")
        first = message.split(": ")[0] if len(message) > 90 else message
        self._status.setText(f"Error: {first}" if len(first) < 90 else "Error (see the message above)")
        self.error_shown.emit(message)

    def clear_error(self) -> None:
        """A later action succeeded: take down the error banner and an error status line."""
        if self.banner.isVisible() and self.banner.kind == "error":
            self.banner.hide()
        self.error_message = None
        if self._status.text().startswith("Error"):
            self._status.setText("Ready")

    def show_status(self, message: str) -> None:
        self._status.setText(message)

    def status_text(self) -> str:
        return self._status.text()

    # ================================================================== jobs
    def run_job(self, fn, on_done: Callable[[Any], None], on_error: Optional[Callable[[str], None]] = None,
                name: str = "job"):
        """Queue ``fn(progress, cancel)`` on the MLX worker; ``on_done(result)`` or
        ``on_error(message)`` run on the GUI thread afterwards."""
        return self.runner.submit(fn, name=name, on_done=on_done, on_error=on_error or self.show_error)

    @property
    def busy(self) -> bool:
        return self._loading

    def cancel_current(self) -> None:
        job = self.runner.running_job()
        if job is not None:
            job.cancel()

    def _job_started(self, job) -> None:
        self._error_at_start[job.id] = self._error_seq
        if job.background:
            self._job_label.setText("computing weight error…")
            return
        self._job_label.setText(job.name)
        self._bar.setRange(0, 0)
        self._bar.show()
        self._cancel.show()

    def _job_progress(self, job, fraction, message: str) -> None:
        if job.background:
            return
        if fraction is None:
            self._bar.setRange(0, 0)
        else:
            self._bar.setRange(0, 1000)
            self._bar.setValue(int(max(0.0, min(1.0, fraction)) * 1000))
        if message:
            self._status.setText(message[:1].upper() + message[1:])
            self._progress_status = self._status.text()

    def _job_finished(self, job) -> None:
        seq = self._error_at_start.pop(job.id, None)
        if job.state == "done" and not job.background and seq == self._error_seq:
            self.clear_error()  # it succeeded, and nothing went wrong meanwhile
        if not self.runner.active_jobs(include_background=False):
            self._bar.hide()
            self._cancel.hide()
        if not self.runner.active_jobs():
            self._job_label.setText("")
        if job.state == "cancelled" and not job.background:
            self._status.setText(f"{job.name.capitalize()} cancelled")
        elif not job.background and self._status.text() == self._progress_status:
            self._status.setText("Ready")  # a stale progress message

    # ================================================================== model
    def _choose_folder(self) -> None:
        d = self.ask_directory("Open a model folder (mlx-lm / Hugging Face)")
        if d:
            self.load_model(d)

    def _choose_gguf(self) -> None:
        f = self.ask_open_path("Open a GGUF file", "GGUF files (*.gguf);;All files (*)")
        if f:
            self.load_model(f)

    def _choose_hub(self) -> None:
        text, ok = QInputDialog.getText(self, "Open from the Hugging Face hub", "Repository id (org/name):")
        if ok and text.strip():
            self.load_model(text.strip())

    def load_model(self, source: Optional[str] = None) -> bool:
        """Open ``source`` (folder, .gguf, hub id; None: the default model) on the worker.

        Nothing of the open model changes until the new one has loaded: a failed open leaves the
        model, its configuration, the views and the undo history as they were, and says why once
        (in the banner)."""
        if self._loading:
            return False
        if self.project.has_model and not self._may_discard():
            return False
        name = "the default model" if source in (None, "", "default") else str(source)
        self.panel.set_loading(f"Opening {name}…")
        self._set_loading(True, f"Opening {name}…")
        cache = self.build_cache
        inner = tasks.load_model_job(None if source in (None, "", "default") else source)

        def job(progress, cancel):
            result = inner(progress, cancel)
            cache.clear()  # the previous model's built copy (on the worker), once the new one is open
            return result

        self.runner.submit(job, name="open model", on_done=lambda r: self._on_model(r, source),
                           on_error=lambda msg: self._on_model_error(msg, name))
        return True

    def _set_loading(self, loading: bool, message: str = "") -> None:
        self._loading = loading
        for a in (self.open_folder_action, self.open_gguf_action, self.open_default_action, self.open_hub_action):
            a.setEnabled(not loading)
        self.recent_models_menu.setEnabled(not loading)
        self.panel.set_busy(loading)
        if message:
            self._status.setText(message)

    def _on_model(self, result, source) -> None:
        loaded, d = result
        for j in self._metrics_jobs:  # the previous model's weight errors
            j.cancel()
        self.description = d
        self.panel.set_loading("")
        self.panel.show_description(d)
        self.project.set_model(loaded, d)
        self._set_loading(False, f"Loaded {d['architecture']} model: {d['num_blocks']} blocks, "
                                 f"{d['parameters']:,} parameters ({loaded.path})")
        if self.remember_models:
            self._add_recent("recent/models", "default" if source in (None, "", "default") else str(source))
            self.settings.setValue("model/last", "" if source in (None, "", "default") else str(source))
        self._update_title()
        self.model_loaded.emit(d)

    def _on_model_error(self, message: str, name: str = "the model") -> None:
        self.panel.set_loading("")
        self._set_loading(False)
        if message == "cancelled":
            self.show_status(f"Opening {name} cancelled; nothing changed.")
            self.load_failed.emit(message)
            return
        kept = self.project.has_model
        self.show_error(user_message(message) + (" The open model is unchanged." if kept else ""))
        self.show_status(f"Could not open {name}" + ("; the open model is unchanged." if kept else "."))
        if not kept:
            self.panel.clear("No model loaded")
        self._sync_actions()
        self._update_title()
        self.load_failed.emit(message)

    # ================================================================== weight-error metrics
    def _config_replaced(self) -> None:
        self._schedule_metrics(list(range(self.project.num_blocks)))
        self._update_title()

    def _schedule_metrics(self, blocks: list) -> None:
        self._metrics_pending.update(blocks)
        self._metrics_timer.start()

    def _submit_metrics(self) -> None:
        p = self.project
        if not p.has_model or self.runner.closed:
            return
        todo = sorted(k for k in self._metrics_pending if k < p.num_blocks and p.metrics_for(k) is None)
        self._metrics_pending.clear()
        if not todo:
            return
        if len(todo) == p.num_blocks:
            for j in self._metrics_jobs:
                j.cancel()
        self._metrics_jobs = [j for j in self._metrics_jobs if j.active]
        cfg = snapshot(p.config)
        for i in range(0, len(todo), METRICS_CHUNK):
            chunk = todo[i:i + METRICS_CHUNK]
            revs = {k: p.block_rev[k] for k in chunk}
            self._metrics_jobs.append(self.runner.submit(
                tasks.block_metrics_job(p.loaded, cfg, chunk, revs), name="weight error", priority=BACKGROUND,
                on_done=p.accept_metrics, on_error=lambda msg: None if msg == "cancelled"
                else self._status.setText(f"Weight error: {msg}")))

    def metrics_idle(self) -> bool:
        return not any(j.active for j in self._metrics_jobs) and not self._metrics_timer.isActive()

    # ================================================================== export
    def _sync_actions(self) -> None:
        p = self.project
        self.export_action.setEnabled(p.has_model and not (self._export_job is not None and self._export_job.active))
        self.search_action.setEnabled(p.has_model and not p.locked
                                      and not (self._search_job is not None and self._search_job.active))
        self.sensitivity_action.setEnabled(
            p.has_model and not (self._sensitivity_job is not None and self._sensitivity_job.active))

    def export_model(self, out_dir: Optional[str] = None) -> bool:
        """Ask for a folder, preview (size, bits/weight, loading needs), confirm, then write an
        mlx-lm model folder on the worker (progress and Cancel in the status bar)."""
        p = self.project
        if not p.has_model:
            self.show_error("Open a model first.")
            return False
        if self._export_job is not None and self._export_job.active:
            return False
        if out_dir is None:
            model = Path(str((self.description or {}).get("path", ""))).name or "model"
            out_dir = self.ask_export_dir(f"{model}-{p.display_name.removesuffix('.json')}-dupstudio")
            if not out_dir:
                return False
        out_dir = str(Path(out_dir).expanduser().absolute())
        cfg = snapshot(p.config)
        loaded = p.loaded
        self.show_status(f"Estimating the export to {out_dir}…")

        def previewed(preview: dict) -> None:
            preview = dict(preview, checks=export_checks(cfg))
            if not self.confirm_export(preview):
                self._export_job = None
                self._sync_actions()
                self.show_status("Export cancelled")
                self.export_finished.emit("cancelled")
                return
            self._export_job = self.runner.submit(tasks.export_job(loaded, cfg, out_dir), name="export model",
                                                  on_done=exported, on_error=failed)
            self._sync_actions()

        def exported(r: dict) -> None:
            self._export_job = None
            self._sync_actions()
            msg = (f"Exported to {r['path']} ({r['bytes'] / 1e6:.1f} MB, {r['bits_per_weight']:.3f} bits/weight"
                   + (", load with --trust-remote-code" if r.get("trust_remote_code") else "") + ")")
            self.banner.show_message(msg, "info")
            self.show_status(msg)
            self.export_finished.emit("done")

        def failed(msg: str) -> None:
            self._export_job = None
            self._sync_actions()
            if msg == "cancelled":
                self.show_status("Export cancelled; nothing was written.")
                self.export_finished.emit("cancelled")
            else:
                self.show_error(f"Could not export the model: {msg}")
                self.export_finished.emit("failed")

        self._export_job = self.runner.submit(tasks.preview_export_job(loaded, cfg, out_dir),
                                              name="export preview", on_done=previewed, on_error=failed)
        self._sync_actions()
        return True

    # ================================================================== search
    def _search_profile(self) -> Optional[str]:
        """The profile the Roofline tab shows (this machine once measured there), for the search's
        latency budget."""
        return self.roofline.search_profile()

    def search_configurations(self, values: Optional[dict] = None) -> bool:
        """The budgeted search (core ``search.search``) on the worker; its result replaces the
        configuration as one undoable step. ``values``: the dialog's answer (plus, optionally,
        ``settings`` (CalibSettings), ``kl_windows``, ``max_refine``)."""
        p = self.project
        if not p.has_model:
            self.show_error("Open a model first.")
            return False
        if p.locked or (self._search_job is not None and self._search_job.active):
            self.show_error("Wait for the running calibration or search to end.")
            return False
        if values is None:
            values = self.ask_search_settings()
            if not values:
                return False
        text = values.get("text") or ""
        if not text:
            text = self.ask_text_file("Choose a calibration text") or ""
            if not text:
                return False
        try:
            settings = values.get("settings") or self.calibration.settings()
            budget = float(values.get("budget_bpw", 2.5))
            lat = values.get("budget_latency_ms")
            lat = float(lat) if lat not in (None, "", 0, 0.0) else None
        except (DupstudioError, TypeError, ValueError) as e:
            self.show_error(f"Search settings: {e}")
            return False
        p.set_locked(True)

        def finish() -> None:
            self._search_job = None
            p.set_locked(False)
            self._sync_actions()

        def done(cfg) -> None:
            finish()
            info = cfg.provenance.get("search", {}) if isinstance(cfg.provenance, dict) else {}
            chosen = info.get("chosen", {})
            p.replace_config(cfg, f"Search ({budget:g} bits/weight" + (f", {lat:g} ms" if lat else "") + ")")
            msg = (f"Search: {len(chosen)} block{'s' if len(chosen) != 1 else ''} upgraded, "
                   f"{info.get('bits_per_weight', float('nan')):.3f} bits/weight"
                   + (f", in {fmt_seconds(info['seconds'])}" if "seconds" in info else "")
                   + ". Undo (Ctrl+Z) restores the previous configuration.")
            self.banner.show_message(msg, "info")
            self.show_status(msg)
            self.tabs.setCurrentWidget(self.layers)
            self.search_finished.emit("done")

        def failed(msg: str) -> None:
            finish()
            if msg == "cancelled":
                self.show_status("Search cancelled; the configuration is unchanged.")
                self.search_finished.emit("cancelled")
            else:
                self.show_error(f"Search failed: {msg}")
                self.search_finished.emit("failed")

        kw = {k: int(values[k]) for k in ("kl_windows", "max_refine") if k in values}
        self._search_job = self.runner.submit(
            tasks.search_job(p.loaded, str(text), budget, lat, settings, self._search_profile(), **kw),
            name="search", on_done=done, on_error=failed)
        self.settings.setValue("calibration/text", str(text))
        self._sync_actions()
        return True

    # ================================================================== sensitivity
    def _sensitivity_base_text(self) -> str:
        cfg = self.project.config
        if cfg is None:
            return ""
        d = cfg.defaults
        mixed = any(b.bits is not None or b.group_size is not None for b in cfg.blocks)
        return f"{d.bits}-bit g{d.group_size}" + (" with per-block overrides" if mixed else "")

    def run_sensitivity(self, values: Optional[dict] = None) -> bool:
        """Per-block sensitivity (core ``sensitivity.sensitivity``) of the layer table's quantization
        (every block at K = 1) on the worker; the bars and table fill the Sensitivity dock as blocks
        finish. ``values``: the dialog's answer (plus, optionally, ``settings`` (CalibSettings))."""
        from dupstudio.core.sensitivity import parse_blocks

        p = self.project
        if not p.has_model:
            self.show_error("Open a model first.")
            return False
        if self._sensitivity_job is not None and self._sensitivity_job.active:
            self.show_error("A sensitivity run is already going; cancel it first.")
            return False
        if values is None:
            values = self.ask_sensitivity_settings()
            if not values:
                return False
        text = values.get("text") or ""
        if not text:
            text = self.ask_text_file("Choose a calibration text") or ""
            if not text:
                return False
        try:
            settings = values.get("settings") or self.calibration.settings()
            blocks = parse_blocks(values.get("blocks"), p.num_blocks)
            kl_windows = int(values.get("kl_windows", 8))
            mode = str(values.get("mode") or "serial")
            with_replica = bool(values.get("with_replica", True))
            if kl_windows < 1:
                raise DupstudioError("KL windows must be at least 1")
        except (DupstudioError, TypeError, ValueError) as e:
            self.show_error(f"Sensitivity: {e}")
            return False
        cfg = baseline_config(snapshot(p.config))
        loaded = p.loaded
        title = (f"Only block k quantized ({self._sensitivity_base_text()})"
                 + (f", gain of a second {mode} replica" if with_replica else "")
                 + f"; KL on {kl_windows} window{'s' if kl_windows != 1 else ''} of {Path(str(text)).name}")

        def finish() -> None:
            self._sensitivity_job = None
            self._sync_actions()

        def done(df) -> None:
            finish()
            self._sensitivity_model = loaded
            self.sensitivity.show_result(df, title)
            best = self.sensitivity.top_blocks()
            msg = (f"Sensitivity of {len(df)} block{'s' if len(df) != 1 else ''} in "
                   f"{fmt_seconds(df.attrs.get('seconds', 0.0))}"
                   + (f"; largest second-replica gains: blocks {', '.join(map(str, best))}" if best else "")
                   + ".")
            self.show_status(msg)
            self.sensitivity_finished.emit("done")

        def failed(msg: str) -> None:
            finish()
            if msg == "cancelled":
                self.sensitivity.failed("Cancelled")
                self.show_status("Sensitivity cancelled.")
                self.sensitivity_finished.emit("cancelled")
            else:
                self.sensitivity.failed(f"Failed: {msg}")
                self.show_error(f"Sensitivity failed: {msg}")
                self.sensitivity_finished.emit("failed")

        self.sensitivity.started(f"Measuring {len(blocks)} block{'s' if len(blocks) != 1 else ''}…", mode)
        self.sensitivity_dock.show()
        self.sensitivity_dock.raise_()
        self._sensitivity_job = self.runner.submit(
            tasks.sensitivity_job(loaded, cfg, str(text), settings, kl_windows=kl_windows, mode=mode,
                                  with_replica=with_replica, blocks=blocks),
            name="sensitivity", on_done=done, on_error=failed, on_event=self.sensitivity.add_row,
            on_progress=self.sensitivity.bar.progress)
        self.settings.setValue("calibration/text", str(text))
        self._sync_actions()
        return True

    def cancel_sensitivity(self) -> None:
        if self._sensitivity_job is not None and self._sensitivity_job.active:
            self._sensitivity_job.cancel()

    def apply_sensitivity(self, blocks: list, mode: str = "serial") -> int:
        """Give ``blocks`` a second replica in ``mode`` (one undoable step); returns how many changed."""
        p = self.project
        if not p.has_model:
            self.show_error("Open a model first.")
            return 0
        if self._sensitivity_model is not None and p.loaded is not self._sensitivity_model:
            self.show_error("The sensitivity was measured on another model; run it again.")
            return 0
        if p.locked:
            self.show_error("Wait for the running calibration or search to end.")
            return 0
        cfg = p.config
        need = [int(k) for k in blocks if 0 <= int(k) < p.num_blocks
                and (cfg.blocks[int(k)].replicas != 2 or cfg.blocks[int(k)].mode != mode)]
        where = ", ".join(map(str, sorted(need)))
        if not need:
            self.show_status(f"Blocks {', '.join(map(str, blocks))} already have K = 2 ({mode}).")
            return 0
        stack = p.undo_stack
        stack.beginMacro(f"Sensitivity: K = 2 ({mode}) on block{'s' if len(need) != 1 else ''} {where}")
        try:
            p.edit_blocks(need, "replicas", 2)
            p.edit_blocks(need, "mode", mode)
        except DupstudioError as e:
            stack.endMacro()
            stack.undo()
            self.show_error(f"Could not apply the sensitivity result: {e}")
            return 0
        stack.endMacro()
        msg = (f"K = 2 ({mode}) on block{'s' if len(need) != 1 else ''} {where}, the largest second-replica "
               "gains; calibrate to tune them. Undo (Ctrl+Z) restores the previous table.")
        self.banner.show_message(msg, "info")
        self.show_status(msg)
        self.tabs.setCurrentWidget(self.layers)
        self.layers.apply_bar.select_rows(sorted(need))
        return len(need)

    # ================================================================== configuration files
    def new_configuration(self, values: Optional[dict] = None) -> bool:
        p = self.project
        if not p.has_model:
            self.show_error("Open a model first.")
            return False
        if not self._may_discard():
            return False
        if values is None:
            dlg = NewConfigDialog(p.shape, self)
            if dlg.exec() != QDialog.Accepted:
                return False
            values = dlg.values()
        try:
            p.new_config(**values)
        except DupstudioError as e:
            self.show_error(str(e))
            return False
        self.show_status("New configuration")
        return True

    def open_configuration(self, path: Optional[str] = None) -> bool:
        p = self.project
        if not p.has_model:
            self.show_error("Open a model first: a configuration belongs to a model.")
            return False
        if not self._may_discard():
            return False
        if path is None:
            path = self.ask_open_path("Open a configuration", "Configurations (*.json);;All files (*)")
            if not path:
                return False
        self._status.setText(f"Opening {path}…")
        self.runner.submit(tasks.load_config_job(str(path), p.shape), name="open configuration",
                           on_done=lambda cfg: self._config_loaded(cfg, path),
                           on_error=lambda msg: self._config_error(f"Could not open the configuration: {msg}"))
        return True

    def _config_loaded(self, cfg, path) -> None:
        self.project.set_config(cfg, Path(path))
        self._add_recent("recent/configs", str(path))
        notes = cfg.provenance.get("notes") if isinstance(cfg.provenance, dict) else None
        self.show_status(f"Opened {path}" + (f" ({'; '.join(notes)})" if notes else ""))
        self.config_opened.emit(str(path))

    def _config_error(self, message: str) -> None:
        self.show_error(message)
        self.config_failed.emit(message)

    def save(self) -> bool:
        if self.project.config is None:
            return False
        if self.project.path is None:
            return self.save_as()
        return self._save_to(str(self.project.path))

    def save_as(self, path: Optional[str] = None) -> bool:
        if self.project.config is None:
            return False
        if path is None:
            path = self.ask_save_path("Save the configuration", f"{self.project.display_name.removesuffix('.json')}.json",
                                      "Configurations (*.json)")
            if not path:
                return False
            if not path.endswith(".json"):
                path += ".json"
        return self._save_to(path)

    def _save_to(self, path: str) -> bool:
        p = self.project
        cfg = snapshot(p.config)
        index = p.undo_stack.index()
        self._status.setText(f"Saving {path}…")

        def done(r) -> None:
            if p.undo_stack.index() == index:
                p.saved_as(Path(r["path"]), r["tensors_file"])
            else:  # edited while saving: the file holds the earlier state
                p.config.tensors_file = r["tensors_file"]
                p.path = Path(r["path"])
                p.path_changed.emit(p.path)
            self._add_recent("recent/configs", r["path"])
            self.show_status(f"Saved {r['path']}" + (f" (+ {r['tensors_file']})" if r["tensors_file"] else ""))
            self.config_saved.emit(r["path"])
            if self._closing_after_save:
                self.close()

        def failed(msg: str) -> None:
            self._closing_after_save = False
            self._config_error(f"Could not save the configuration: {msg}")

        self.runner.submit(tasks.save_config_job(cfg, path), name="save configuration", on_done=done,
                           on_error=failed)
        return True

    # ================================================================== recent files
    def _recent(self, key: str) -> list:
        v = self.settings.value(key, [])
        if isinstance(v, str):
            v = [v] if v else []
        return [str(x) for x in (v or [])]

    def _add_recent(self, key: str, item: str) -> None:
        items = [item] + [x for x in self._recent(key) if x != item]
        self.settings.setValue(key, items[:MAX_RECENT])
        self._refresh_recent_menus()

    @staticmethod
    def recent_model_text(source: str) -> str:
        """How Recent models names an entry: the default model by name, paths shortened to ~."""
        if source in ("default", "", None):
            return "Default model (SmolLM2-135M-Instruct)"
        home = str(Path.home())
        return "~" + source[len(home):] if source.startswith(home + "/") else source

    def _refresh_recent_menus(self) -> None:
        for menu, key, slot in ((self.recent_models_menu, "recent/models", self.load_model),
                                (self.recent_configs_menu, "recent/configs", self.open_configuration)):
            menu.clear()
            items = self._recent(key)
            for it in items:
                a = menu.addAction(self.recent_model_text(it) if key == "recent/models" else it)
                a.setToolTip(it)
                a.triggered.connect(lambda _c=False, it=it, slot=slot: slot(it))
            if items:
                menu.addSeparator()
                clear = menu.addAction("Clear this list")
                clear.triggered.connect(lambda _c=False, key=key: self._clear_recent(key))
            else:
                a = menu.addAction("(none yet)")
                a.setEnabled(False)
        self.panel.set_recent([(self.recent_model_text(it), it) for it in self._recent("recent/models")])

    def _clear_recent(self, key: str) -> None:
        self.settings.setValue(key, [])
        self._refresh_recent_menus()

    # ================================================================== title, settings, close
    def _update_title(self) -> None:
        p = self.project
        if p.config is None or self.description is None:
            self.setWindowTitle("dupstudio")
            return
        model = Path(str(self.description.get("path", ""))).name or str(self.description.get("source"))
        self.setWindowTitle(f"{p.display_name}{'*' if p.dirty else ''} — {model} — dupstudio")

    def _size_dock(self, dock, width: int) -> None:
        """A dock opened for the first time gets a readable width (later: the remembered one),
        never more than a third of the window."""
        key = f"window/sized/{dock.objectName()}"
        if self.settings.value(key, False) in (True, "true") or dock.isFloating():
            return
        self.settings.setValue(key, True)
        self.resizeDocks([dock], [min(width, max(self.width() // 3, 200))], Qt.Horizontal)

    def fit_to_screen(self) -> None:
        """The window within the screen's available area (the first start's size, and after a
        restore on a smaller screen)."""
        screen = self.screen() or QApplication.primaryScreen()
        if screen is None:
            return
        avail = screen.availableGeometry()
        frame = self.frameGeometry().size() - self.size()  # title bar and borders, once decorated
        w = min(self.width(), avail.width() - max(frame.width(), 0))
        h = min(self.height(), avail.height() - max(frame.height(), 0))
        if (w, h) != (self.width(), self.height()):
            self.resize(w, h)

    def _restore_settings(self) -> None:
        geo = self.settings.value("window/geometry")
        if geo is not None:
            self.restoreGeometry(geo)
        self.fit_to_screen()
        state = self.settings.value("window/state")
        if state is not None:
            self.restoreState(state, STATE_VERSION)
        tab = self.settings.value("window/tab")
        if tab is not None:
            try:
                self.tabs.setCurrentIndex(int(tab))
            except (TypeError, ValueError):
                pass
        t = self.settings.value("calibration/text", "")
        if t and not self.calibration.text.path() and Path(str(t)).exists():
            self.calibration.text.set_path(str(t))
        t = self.settings.value("evaluation/text", "")
        if t and Path(str(t)).exists():
            self.evaluation.text.set_path(str(t))
        prompt = self.settings.value("generation/prompt", "")
        if prompt:
            self.generation.prompt.setPlainText(str(prompt))

    def _save_settings(self) -> None:
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.settings.setValue("window/state", self.saveState(STATE_VERSION))
        self.settings.setValue("window/tab", self.tabs.currentIndex())
        self.settings.sync()

    def showEvent(self, ev) -> None:  # noqa: N802
        super().showEvent(ev)
        if not self._shown_once:
            self._shown_once = True
            self.fit_to_screen()

    def dragEnterEvent(self, ev) -> None:  # noqa: N802
        md = ev.mimeData()
        if md.hasUrls() and all(u.isLocalFile() for u in md.urls()):
            ev.acceptProposedAction()
        else:
            ev.ignore()

    def dropEvent(self, ev) -> None:  # noqa: N802
        urls = [u.toLocalFile() for u in ev.mimeData().urls() if u.isLocalFile()]
        if not urls:
            return
        ev.acceptProposedAction()
        self.open_path(urls[0])

    def open_path(self, path: str) -> bool:
        """A dropped / command-line path: configuration JSON, or a model folder / .gguf."""
        if str(path).lower().endswith(".json") and Path(path).is_file():
            return self.open_configuration(path)
        return self.load_model(path)

    def shutdown(self) -> None:
        """Cancel running work and stop the worker thread (idempotent)."""
        if self._shut:
            return
        self._shut = True
        self._metrics_timer.stop()
        try:
            self._save_settings()
        except RuntimeError:
            pass
        self.runner.shutdown()
        self.project.detach()
        theme.off_change(self.apply_theme)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        if self.project.dirty and not self._closing_after_save and not self._shut:
            answer = self.confirm_discard()
            if answer == "cancel":
                event.ignore()
                return
            if answer == "save":
                self._closing_after_save = True
                if not self.save():
                    self._closing_after_save = False
                event.ignore()
                return
        self.shutdown()
        super().closeEvent(event)
