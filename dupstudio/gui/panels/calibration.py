"""Calibration tab: tune the replicas' parameters on a text, in the worker, with a live loss curve;
the result replaces the configuration through one undoable command."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from dupstudio.core.jobs import DupstudioError
from dupstudio.gui import tasks
from dupstudio.gui.project import Project, snapshot
from dupstudio.gui.widgets import JobBar, PathEdit, fmt_seconds, make_plot, placeholder


def resources_dir() -> Path:
    base = getattr(sys, "_MEIPASS", None)
    if base and (Path(base) / "resources").exists():
        return Path(base) / "resources"
    return Path(__file__).resolve().parents[3] / "resources"


def default_calibration_text() -> Optional[Path]:
    """The bundled calibration text (``resources/calibration/*.txt``), if any."""
    d = resources_dir() / "calibration"
    if d.is_dir():
        files = sorted(p for p in d.glob("*.txt") if "licen" not in p.name.lower()
                       and "readme" not in p.name.lower())
        if files:
            return files[0]
    return None


class CalibrationPanel(QWidget):
    finished = Signal(str)  # "done", "cancelled" or "failed"

    def __init__(self, project: Project, window, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.project, self.window = project, window
        self.job = None
        self.steps_x: list = []
        self.losses: list = []
        self.last_result: Optional[dict] = None
        self.last_message = ""

        lay = QVBoxLayout(self)
        top = QHBoxLayout()
        box = QGroupBox("Calibration settings")
        form = QFormLayout(box)
        self.text = PathEdit("Choose a calibration text")
        d = default_calibration_text()
        if d:
            self.text.set_path(str(d))
        form.addRow("Text file:", self.text)
        row = QHBoxLayout()
        self.method = QComboBox()
        for m, tip in (("adam", "closed-form start, then Adam steps on the block-output loss"),
                       ("stats", "closed forms from activation statistics (fast, no steps)"),
                       ("grid", "grid search over replica γ, offset and α")):
            self.method.addItem(m, m)
            self.method.setItemData(self.method.count() - 1, tip, Qt.ToolTipRole)
        row.addWidget(QLabel("Method"))
        row.addWidget(self.method)
        self.preset = QComboBox()
        self.preset.addItem("fast (≤ 10 min on 2 cores)", "fast")
        self.preset.addItem("full (reference recipe)", "full")
        row.addSpacing(10)
        row.addWidget(QLabel("Preset"))
        row.addWidget(self.preset)
        row.addStretch(1)
        form.addRow(row)
        row = QHBoxLayout()
        self.steps = QSpinBox()
        self.steps.setRange(0, 100000)
        self.seqs = QSpinBox()
        self.seqs.setRange(1, 100000)
        self.seq_len = QSpinBox()
        self.seq_len.setRange(16, 8192)
        self.batch = QSpinBox()
        self.batch.setRange(1, 1024)
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(4)
        self.lr.setRange(1e-5, 1.0)
        self.lr.setSingleStep(1e-3)
        for label, w in (("Steps / block", self.steps), ("Sequences", self.seqs), ("Length", self.seq_len),
                         ("Batch", self.batch), ("LR", self.lr)):
            row.addWidget(QLabel(label))
            row.addWidget(w)
            row.addSpacing(6)
        row.addStretch(1)
        form.addRow(row)
        self.resume = QCheckBox("Resume a stopped run (finished blocks are kept on disk)")
        self.resume.setChecked(True)
        form.addRow(self.resume)
        top.addWidget(box, 1)

        side = QVBoxLayout()
        self.run_button = QPushButton("Calibrate")
        self.run_button.setDefault(True)
        self.run_button.setMinimumHeight(34)
        self.run_button.clicked.connect(self.start)
        side.addWidget(self.run_button)
        self.summary = QLabel("Replica parameters are tuned block by block on the text; a block keeps "
                              "new parameters only if its loss went down.")
        self.summary.setWordWrap(True)
        self.summary.setMinimumWidth(320)
        self.summary.setMaximumWidth(440)
        side.addWidget(self.summary)
        self.memory = QLabel()
        self.memory.setObjectName("calibrationMemory")
        self.memory.setWordWrap(True)
        self.memory.setMinimumWidth(320)
        self.memory.setMaximumWidth(440)
        self.memory.setTextFormat(Qt.RichText)
        side.addWidget(self.memory)
        self.memory_estimate: Optional[dict] = None
        self.will_stream = False
        side.addStretch(1)
        top.addLayout(side)
        lay.addLayout(top)

        self.bar = JobBar("Cancel")
        self.bar.cancel_clicked.connect(self.cancel)
        lay.addWidget(self.bar)

        plots = QHBoxLayout()
        self.loss_plot = make_plot("Training loss (block-output MSE per Adam step)", "step (all blocks)",
                                   "loss", log_y=True)
        self.loss_curve = pg.PlotDataItem([], [], pen=pg.mkPen("#1f77b4", width=1.5))
        self.loss_plot.addItem(self.loss_curve)
        self.block_plot = make_plot("Block loss before / after calibration", "block", "loss",
                                    log_y=True, legend=True, legend_at="left")
        plots.addWidget(self.loss_plot, 3)
        plots.addWidget(self.block_plot, 2)
        lay.addLayout(plots, 1)
        self._note = placeholder(self.block_plot, "run a calibration")

        self._redraw = QTimer(self)
        self._redraw.setInterval(100)
        self._redraw.timeout.connect(self._update_curve)
        self._curve_dirty = False
        self._boundaries: list = []

        self.preset.currentIndexChanged.connect(self._preset_changed)
        self._preset_changed()
        project.busy_changed.connect(lambda _b: self._sync_buttons())
        project.model_changed.connect(self._sync_buttons)
        project.config_replaced.connect(self._show_records)
        for w in (self.seqs, self.seq_len, self.batch):
            w.valueChanged.connect(self.update_memory)
        for w in (self.method, self.preset):
            w.currentIndexChanged.connect(self.update_memory)
        self.resume.toggled.connect(self.update_memory)
        project.model_changed.connect(self.update_memory)
        project.config_replaced.connect(self.update_memory)
        project.blocks_changed.connect(self.update_memory)
        self._sync_buttons()
        self.update_memory()

    def _show_records(self) -> None:
        """Plot the calibration records the current configuration carries (after undo, open, …)."""
        if self.running() or self.project.config is None:
            return
        recs = [dict(b.calibration, index=b.calibration.get("index", b.index))
                for b in self.project.config.blocks if b.calibration]
        self.block_plot.getPlotItem().clear()
        if recs:
            self.plot_blocks(recs)

    # ------------------------------------------------------------------ settings
    def _preset_changed(self) -> None:
        from dupstudio.core.calibrate import PRESETS

        s = PRESETS[self.preset.currentData()]
        self.steps.setValue(s.steps)
        self.seqs.setValue(s.seqs)
        self.seq_len.setValue(s.seq_len)
        self.batch.setValue(s.batch)
        self.lr.setValue(s.lr)

    def settings(self):
        from dupstudio.core.calibrate import settings_from

        return settings_from(self.preset.currentData(), method=self.method.currentData(),
                             steps=self.steps.value(), seqs=self.seqs.value(), seq_len=self.seq_len.value(),
                             batch=self.batch.value(), lr=self.lr.value())

    def set_settings(self, *, method=None, preset=None, steps=None, seqs=None, seq_len=None, batch=None) -> None:
        if preset:
            self.preset.setCurrentIndex(self.preset.findData(preset))
        if method:
            self.method.setCurrentIndex(self.method.findData(method))
        for w, v in ((self.steps, steps), (self.seqs, seqs), (self.seq_len, seq_len), (self.batch, batch)):
            if v is not None:
                w.setValue(int(v))

    def update_memory(self, *_a) -> None:
        """Estimated peak memory of both calibration paths and the one a run will take: streamed
        (one block's float weights at a time) when the in-memory path would not fit the
        available memory plus the float model the app already holds."""
        from dupstudio.core import streaming as S

        p = self.project
        if not p.has_model:
            self.memory_estimate, self.will_stream = None, False
            self.memory.setText("")
            return
        try:
            s = self.settings()
        except DupstudioError as e:
            self.memory.setText(f"Memory estimate: {e}")
            return
        est = S.estimate_calibration_memory(p.loaded.config, p.config, s.seqs, s.seq_len, s,
                                            checkpoint=self.resume.isChecked())
        avail = S.available_memory()
        held = est["float_model_bytes"]  # the open model is already in memory
        self.will_stream = S.pick_stream(est["in_memory_bytes"], avail, resident=held)
        self.memory_estimate = dict(est, available_bytes=avail, stream=self.will_stream)
        h = S.human_bytes
        path = "<b>streamed</b> (one block at a time)" if self.will_stream else "<b>in memory</b>"
        self.memory.setText(
            f"Peak memory (estimate): in memory {h(est['in_memory_bytes'])} · streamed "
            f"{h(est['streamed_bytes'])}<br>available {h(avail)} + the open model "
            f"{h(held)} → {path}")
        self.memory.setToolTip(
            f"Float model {h(est['float_model_bytes'])} (streamed: one block, "
            f"{h(est['float_block_bytes'])}, or the embedding, {h(est['embedding_bytes'])}); "
            f"quantized blocks {h(est['quantized_bytes'])}; one block's calibration problem "
            f"(codes, XᵀX, dequantized weights and gradients, Adam state, a batch) "
            f"{h(est['block_work_bytes'])}; activations {h(est['activation_bytes'])}. "
            "Plus ~0.3 GB for the runtime.")

    def running(self) -> bool:
        return self.job is not None and self.job.active

    def _sync_buttons(self) -> None:
        self.run_button.setEnabled(self.project.has_model and not self.running())

    # ------------------------------------------------------------------ run
    def start(self) -> bool:
        p = self.project
        if not p.has_model or self.running():
            return False
        if p.locked:
            self.window.show_error("A search is running: calibrate once it ends.")
            return False
        path = self.text.path()
        if not path:
            path = self.window.ask_text_file("Choose a calibration text")
            if not path:
                return False
            self.text.set_path(path)
        try:
            settings = self.settings()
        except DupstudioError as e:
            self.window.show_error(str(e))
            return False
        cfg = snapshot(p.config)
        self.steps_x, self.losses, self._boundaries = [], [], []
        self.loss_curve.setData([], [])
        self.loss_plot.getPlotItem().setTitle("Training loss (block-output MSE per Adam step)", size="10pt")
        self._settings = settings
        self.block_plot.getPlotItem().clear()
        p.set_locked(True)
        self.update_memory()
        stream = self.will_stream
        self.bar.running(f"Calibrating {p.num_blocks} blocks ({settings.method}, "
                         f"{self.preset.currentData()} preset{', streamed' if stream else ''})…")
        self.job = self.window.runner.submit(
            tasks.calibrate_job(p.loaded, cfg, path, settings, resume=self.resume.isChecked(),
                                stream=stream),
            name="calibration", on_done=self._done, on_error=self._failed, on_progress=self.bar.progress,
            on_event=self._event)
        self._redraw.start()
        self._sync_buttons()
        self.window.settings.setValue("calibration/text", path)
        return True

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.bar.message.setText("Cancelling…")

    def _event(self, ev) -> None:
        if ev[0] == "loss":
            _, block, step, loss = ev
            steps = max(self._settings.steps, 1)
            x = block * steps + step
            if step == 0:
                self._boundaries.append(x)
            self.steps_x.append(x)
            self.losses.append(loss)
            self._curve_dirty = True

    def _update_curve(self) -> None:
        if not self._curve_dirty:
            return
        self._curve_dirty = False
        y = np.asarray(self.losses)
        ok = y > 0
        self.loss_curve.setData(np.asarray(self.steps_x)[ok], y[ok])

    def _finish(self) -> None:
        self._redraw.stop()
        self._update_curve()
        self.project.set_locked(False)
        self.job = None
        self._sync_buttons()

    def _done(self, result: dict) -> None:
        self._finish()
        self.last_result = result
        cfg = result["config"]
        recs = [r for r in result["records"] if r]
        acc = sum(1 for r in recs if r.get("accepted"))
        ratio = [r["loss_after"] / r["loss_before"] for r in recs if r.get("loss_before")]
        s = self._settings
        self.project.replace_config(cfg, f"Calibrate ({s.method}, {len(recs)} blocks)")
        self.last_message = (f"Calibrated {len(recs)} blocks in {fmt_seconds(result['seconds'])}: {acc} accepted"
                             + (f", mean loss ratio after/before {np.mean(ratio):.3f}" if ratio else "")
                             + ". Undo (Ctrl+Z) restores the previous configuration.")
        self.summary.setText(self.last_message)
        self.bar.idle(self.last_message, done=True)
        self.plot_blocks(recs)
        if not self.losses and s.method == "adam" and s.steps > 0:
            self.loss_plot.getPlotItem().setTitle(
                "Training loss: no steps this run (blocks resumed from a stopped run)", size="10pt")
        self.window.show_status(self.last_message)
        self.finished.emit("done")

    def _failed(self, message: str) -> None:
        self._finish()
        if message == "cancelled":
            self.last_message = ("Calibration cancelled; the configuration is unchanged."
                                 + (" Finished blocks are kept: run again with the same settings to resume."
                                    if self.resume.isChecked() else ""))
            self.bar.idle(self.last_message)
            self.window.show_status(self.last_message)
            self.finished.emit("cancelled")
        else:
            self.last_message = f"Calibration failed: {message}"
            self.bar.idle(self.last_message)
            self.window.show_error(self.last_message)
            self.finished.emit("failed")

    def plot_blocks(self, recs: list) -> None:
        pi = self.block_plot.getPlotItem()
        pi.clear()
        if not recs:
            return
        xs = np.array([r["index"] for r in recs], dtype=float)
        before = np.array([r["loss_before"] for r in recs], dtype=float)
        after = np.array([r["loss_after"] for r in recs], dtype=float)
        ok = (before > 0) & (after > 0)
        pi.addItem(pg.PlotDataItem(xs[ok], before[ok], pen=pg.mkPen("#d62728", width=1), symbol="o",
                                   symbolSize=6, symbolBrush="#d62728", symbolPen=None, name="before"))
        pi.addItem(pg.PlotDataItem(xs[ok], after[ok], pen=pg.mkPen("#2ca02c", width=1), symbol="s",
                                   symbolSize=6, symbolBrush="#2ca02c", symbolPen=None, name="after"))
        n = int(xs.max()) + 1 if xs.size else 1
        step = max(1, int(np.ceil(n / 15)))
        pi.getAxis("bottom").setTickSpacing(step, step)
        pi.setXRange(-0.5, n - 0.5, padding=0.02)
