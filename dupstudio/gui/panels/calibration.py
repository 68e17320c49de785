"""Calibration tab: tune the replicas' parameters on a text, in the worker, with a live loss curve
and each block's loss before and after as it finishes; all blocks or the ones selected in the
Layers table; an estimate of the time left from the blocks done so far. The result replaces the
configuration through one undoable command (a cancelled run keeps the blocks that finished)."""
from __future__ import annotations

import sys
import time
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
    QRadioButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from dupstudio.core.jobs import DupstudioError
from dupstudio.gui import tasks, theme
from dupstudio.gui.project import Project, snapshot
from dupstudio.gui.strategies import add_tooltips
from dupstudio.gui.widgets import JobBar, PathEdit, fmt_seconds, make_plot, set_legend


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


PRESET_LABELS = {"fast": "fast (about 10 min on 2 cores)", "full": "full (reference recipe)"}
BEFORE_COLOR, AFTER_COLOR = "#d62728", "#2ca02c"


def preset_label(name: str) -> str:
    return PRESET_LABELS.get(name, name)


def setting_tip(name: str) -> str:
    """The tooltip of the control for calibration setting ``name``: the setting's own help line
    (the command line's option reads the same), capitalised."""
    from dupstudio.core.calibration.settings import setting_help

    h = setting_help(name)
    return h[:1].upper() + h[1:]


def describe_blocks(blocks: list) -> str:
    """0,1,2,5,7,8 -> "0–2, 5, 7–8"."""
    out, run = [], []
    for b in sorted(blocks):
        if run and b == run[-1] + 1:
            run.append(b)
            continue
        if run:
            out.append(f"{run[0]}–{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)))
        run = [b]
    if run:
        out.append(f"{run[0]}–{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)))
    return ", ".join(out)


class CalibrationPanel(QWidget):
    finished = Signal(str)  # "done", "cancelled" or "failed"
    block_finished = Signal(int)  # a block's loss before/after arrived (block index)

    def __init__(self, project: Project, window, parent: Optional[QWidget] = None) -> None:
        from dupstudio.core.calibration import settings as CB

        super().__init__(parent)
        self.project, self.window = project, window
        self.job = None
        self.steps_x: list = []
        self.losses: list = []
        self.block_records: list = []  # this run's finished blocks (live before/after plot)
        self.block_times: list = []  # seconds of each block calibrated this run (the time-left estimate)
        self.blocks_done = 0
        self.last_result: Optional[dict] = None
        self.last_message = ""
        self.eta_text = ""
        self._todo: list = []
        self._run_start = self._block_start = 0.0
        self._core_message = ""

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
        for m in CB.METHODS:
            self.method.addItem(m, m)
            self.method.setItemData(self.method.count() - 1, CB.METHOD_HELP.get(m, ""), Qt.ToolTipRole)
        self.method.setToolTip(setting_tip("method"))
        row.addWidget(QLabel("Method"))
        row.addWidget(self.method)
        self.preset = QComboBox()
        for name, ps in CB.PRESETS.items():  # presets added to the core appear here by themselves
            self.preset.addItem(preset_label(name), name)
            self.preset.setItemData(self.preset.count() - 1,
                                    f"{ps.method}, {ps.steps} steps per block, {ps.seqs} × {ps.seq_len} tokens, "
                                    f"batch {ps.batch}", Qt.ToolTipRole)
        row.addSpacing(10)
        row.addWidget(QLabel("Preset"))
        row.addWidget(self.preset)
        self.codes = QComboBox()
        for c in getattr(CB, "CODE_METHODS", ("rtn",)):
            self.codes.addItem(c, c)
        add_tooltips(self.codes, "codes")
        self.codes.setToolTip(setting_tip("codes"))
        row.addSpacing(10)
        row.addWidget(QLabel("Codes"))
        row.addWidget(self.codes)
        self.e2e_steps = QSpinBox()
        self.e2e_steps.setRange(0, 100000)
        self.e2e_steps.setSpecialValueText("off")
        self.e2e_steps.setToolTip(setting_tip("e2e_steps"))
        row.addSpacing(10)
        row.addWidget(QLabel("End-to-end KL steps"))
        row.addWidget(self.e2e_steps)
        self.chat = QCheckBox("Frame as chat")
        self.chat.setObjectName("calibrateChat")
        self.chat.setToolTip(setting_tip("chat"))
        row.addSpacing(10)
        row.addWidget(self.chat)
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
        for label, w, name in (("Steps / block", self.steps, "steps"), ("Sequences", self.seqs, "seqs"),
                               ("Length", self.seq_len, "seq_len"), ("Batch", self.batch, "batch"),
                               ("Learning rate", self.lr, "lr")):
            lab = QLabel(label)
            for x in (lab, w):
                x.setToolTip(setting_tip(name))
            row.addWidget(lab)
            row.addWidget(w)
            row.addSpacing(6)
        row.addStretch(1)
        form.addRow(row)
        row = QHBoxLayout()
        self.all_blocks = QRadioButton("All blocks")
        self.all_blocks.setChecked(True)
        self.selected_blocks = QRadioButton("Only the blocks selected in the Layers table")
        self.selected_blocks.setObjectName("calibrateSelected")
        self.blocks_note = QLabel("")
        self.blocks_note.setStyleSheet(theme.muted_css())
        row.addWidget(QLabel("Blocks"))
        row.addWidget(self.all_blocks)
        row.addWidget(self.selected_blocks)
        row.addWidget(self.blocks_note, 1)
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
        self.summary.setFixedWidth(320)  # a fixed width keeps the wrapped text's height predictable
        side.addWidget(self.summary)
        self.memory = QLabel()
        self.memory.setObjectName("calibrationMemory")
        self.memory.setWordWrap(True)
        self.memory.setFixedWidth(320)
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
        self.loss_plot = make_plot("Training loss (block-output MSE per Adam step)",
                                   "block (its Adam steps from left to right)", "loss", log_y=True)
        self.loss_curve = pg.PlotDataItem([], [], pen=pg.mkPen("#1f77b4", width=1.5), connect="finite")
        self.loss_plot.addItem(self.loss_curve)
        vb = self.loss_plot.getPlotItem().getViewBox()
        vb.sigRangeChanged.connect(lambda *_a: self._block_ticks())
        vb.sigResized.connect(lambda *_a: self._block_ticks())
        self.block_plot = make_plot("Each block's loss before and after calibration", "block",
                                    "block-output loss", log_y=True, legend=True)
        plots.addWidget(self.loss_plot, 3)
        plots.addWidget(self.block_plot, 2)
        lay.addLayout(plots, 1)
        self._empty_note: Optional[pg.TextItem] = None
        self.plot_blocks([])

        self._redraw = QTimer(self)
        self._redraw.setInterval(100)
        self._redraw.timeout.connect(self._update_curve)
        self._clock = QTimer(self)  # the time left counts down between progress reports
        self._clock.setInterval(1000)
        self._clock.timeout.connect(self._show_progress)
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
        self.selected_blocks.toggled.connect(lambda _c: self.update_block_choice())
        project.model_changed.connect(self.update_memory)
        project.config_replaced.connect(self.update_memory)
        project.blocks_changed.connect(self.update_memory)
        self._sync_buttons()
        self.update_memory()
        self.update_block_choice()

    def _show_records(self) -> None:
        """Plot the calibration records the current configuration carries (after undo, open, …)."""
        if self.running() or self.project.config is None:
            return
        recs = [dict(b.calibration, index=b.calibration.get("index", b.index))
                for b in self.project.config.blocks if b.calibration]
        self.plot_blocks(recs)

    # ------------------------------------------------------------------ settings
    def _preset_changed(self) -> None:
        from dupstudio.core.calibration.settings import PRESETS

        s = PRESETS[self.preset.currentData()]
        i = self.method.findData(s.method)
        if i >= 0:
            self.method.setCurrentIndex(i)
        self.steps.setValue(s.steps)
        self.seqs.setValue(s.seqs)
        self.seq_len.setValue(s.seq_len)
        self.batch.setValue(s.batch)
        self.lr.setValue(s.lr)
        i = self.codes.findData(getattr(s, "codes", "rtn"))
        self.codes.setCurrentIndex(max(i, 0))
        self.e2e_steps.setValue(int(getattr(s, "e2e_steps", 0) or 0))
        self.chat.setChecked(bool(getattr(s, "chat", False)))

    def settings(self):
        from dupstudio.core.calibration.settings import PRESETS, settings_from

        preset = self.preset.currentData()
        extra = {}
        if hasattr(PRESETS[preset], "codes"):
            extra["codes"] = self.codes.currentData()
        if hasattr(PRESETS[preset], "e2e_steps"):
            extra["e2e_steps"] = self.e2e_steps.value()
        if hasattr(PRESETS[preset], "chat"):
            extra["chat"] = self.chat.isChecked()
        return settings_from(preset, method=self.method.currentData(), steps=self.steps.value(),
                             seqs=self.seqs.value(), seq_len=self.seq_len.value(), batch=self.batch.value(),
                             lr=self.lr.value(), **extra)

    def set_settings(self, *, method=None, preset=None, steps=None, seqs=None, seq_len=None, batch=None,
                     codes=None, e2e_steps=None) -> None:
        if preset:
            self.preset.setCurrentIndex(self.preset.findData(preset))
        if method:
            self.method.setCurrentIndex(self.method.findData(method))
        if codes:
            self.codes.setCurrentIndex(self.codes.findData(codes))
        for w, v in ((self.steps, steps), (self.seqs, seqs), (self.seq_len, seq_len), (self.batch, batch),
                     (self.e2e_steps, e2e_steps)):
            if v is not None:
                w.setValue(int(v))

    def chosen_blocks(self) -> Optional[list]:
        """The blocks a run calibrates: None for all, else the Layers table's selection."""
        if not self.selected_blocks.isChecked():
            return None
        return self.window.layers.apply_bar.selected_rows()

    def update_block_choice(self) -> None:
        """The note beside "Only the blocks selected": which blocks that is now."""
        rows = self.window.layers.apply_bar.selected_rows() if hasattr(self.window, "layers") else []
        if rows:
            self.blocks_note.setText(f"(now: block{'s' if len(rows) != 1 else ''} {describe_blocks(rows)})")
        else:
            self.blocks_note.setText("(none selected: select rows on the Layers tab)")
        self._sync_buttons()

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
        est = S.estimate_calibration_memory(p.loaded.config, p.config, s.seqs, s.seq_len, s, checkpoint=True)
        avail = S.available_memory()
        held = est["float_model_bytes"]  # the open model is already in memory
        self.will_stream = S.pick_stream(est["in_memory_bytes"], avail, resident=held)
        self.memory_estimate = dict(est, available_bytes=avail, stream=self.will_stream)
        from dupstudio.core.units import human_bytes as h
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
        ok = self.project.has_model and not self.running()
        if ok and self.selected_blocks.isChecked() and hasattr(self.window, "layers"):
            ok = bool(self.window.layers.apply_bar.selected_rows())
        self.run_button.setEnabled(ok)

    # ------------------------------------------------------------------ run
    def start(self) -> bool:
        p = self.project
        if not p.has_model or self.running():
            return False
        if p.locked:
            self.window.show_error("A search is running: calibrate once it ends.")
            return False
        blocks = self.chosen_blocks()
        if blocks is not None and not blocks:
            self.window.show_error("No blocks are selected in the Layers table: select the rows to calibrate, "
                                   "or choose “All blocks”.")
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
        self._todo = list(blocks) if blocks else list(range(p.num_blocks))
        self.steps_x, self.losses, self._boundaries = [], [], []
        self.block_records, self.block_times, self.blocks_done = [], [], 0
        self.loss_curve.setData([], [])
        self.loss_plot.getPlotItem().getAxis("bottom").setTicks(None)
        self.loss_plot.getPlotItem().setTitle("Training loss (block-output MSE per Adam step)", size="10pt")
        self._settings = settings
        self.plot_blocks([], running=True)
        p.set_locked(True)
        self.update_memory()
        stream = self.will_stream
        which = (f"{len(self._todo)} selected block{'s' if len(self._todo) != 1 else ''} "
                 f"({describe_blocks(self._todo)})" if blocks else f"{p.num_blocks} blocks")
        self._run_start = self._block_start = time.monotonic()
        self._core_message = f"Calibrating {which} ({settings.method}, {self.preset.currentData()} preset" \
                             f"{', streamed' if stream else ''})…"
        self.eta_text = "time left: known after the first block"
        self.bar.running("")
        self._show_progress()
        self.job = self.window.runner.submit(
            tasks.calibrate_job(p.loaded, cfg, path, settings, resume=self.resume.isChecked(),
                                stream=stream, blocks=blocks),
            name="calibration", on_done=self._done, on_error=self._failed, on_progress=self._progress,
            on_event=self._event)
        self._redraw.start()
        self._clock.start()
        self._sync_buttons()
        self.window.settings.setValue("calibration/text", path)
        return True

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self._clock.stop()
            self.bar.message.setText("Cancelling… (the blocks already finished will be kept)")

    def _progress(self, fraction, message: str) -> None:
        self.bar.progress(fraction, "")
        if message:
            self._core_message = message[:1].upper() + message[1:]
        self._show_progress()

    def eta_seconds(self) -> Optional[float]:
        """Seconds left: the mean time of the blocks done so far × the blocks left, less the time
        the current block has run (None before the first block finishes)."""
        if not self.block_times:
            return None
        left = len(self._todo) - self.blocks_done
        mean = sum(self.block_times) / len(self.block_times)
        return max(0.0, mean * left - (time.monotonic() - self._block_start))

    def _show_progress(self) -> None:
        if not self.running() and self.job is not None:
            return
        n, done = len(self._todo), self.blocks_done
        head = f"Block {min(done + 1, n)} of {n}" if done < n else f"{n} of {n} blocks done"
        eta = self.eta_seconds()
        if eta is not None:
            self.eta_text = f"about {fmt_seconds(eta)} left" if eta >= 1 else "under 1 s left"
        self.bar.message.setText(f"{head} · {self.eta_text} · {self._core_message}")

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
        elif ev[0] == "block":
            _, k, rec, _i, _n, resumed = ev
            now = time.monotonic()
            self.blocks_done += 1
            if not resumed:  # a resumed block took no time now: it says nothing of the next ones
                self.block_times.append(now - self._block_start)
            self._block_start = now
            if rec:
                self.block_records.append(dict(rec, index=int(k)))
                self.plot_blocks(self.block_records, running=True)
            self._show_progress()
            self.block_finished.emit(int(k))

    def _update_curve(self) -> None:
        if not self._curve_dirty:
            return
        self._curve_dirty = False
        x = np.asarray(self.steps_x, dtype=float)
        y = np.asarray(self.losses, dtype=float)
        ok = y > 0
        x, y = x[ok], y[ok]
        if x.size > 1:  # a gap (no line) between one block's steps and the next block's
            cut = np.where(np.diff(x) != 1)[0] + 1
            x = np.insert(x, cut, np.nan)
            y = np.insert(y, cut, np.nan)
        self.loss_curve.setData(x, y)
        self._block_ticks()

    def _block_ticks(self) -> None:
        """A tick at the middle of each block's steps, named by the block number; ticks closer
        than 30 pixels to the previous one are left out (labels never overlap)."""
        if getattr(self, "_settings", None) is None:
            return
        starts = sorted(set(self._boundaries))
        steps = max(self._settings.steps, 1)
        pi = self.loss_plot.getPlotItem()
        ax = pi.getAxis("bottom")
        if not starts:
            ax.setTicks(None)
            return
        (x0, x1), _ = pi.getViewBox().viewRange()
        px = max(pi.getViewBox().width(), 1.0) / max(x1 - x0, 1e-9)
        ticks, last = [], -1e9
        for b in starts:
            c = b + steps / 2
            if (c - last) * px >= 30:
                ticks.append((c, str(int(b // steps))))
                last = c
        ax.setTicks([ticks, []])

    def _finish(self) -> None:
        self._redraw.stop()
        self._clock.stop()
        self._update_curve()
        self.project.set_locked(False)
        self.job = None
        self._sync_buttons()

    def _done(self, result: dict) -> None:
        self._finish()
        self.last_result = result
        cfg = result["config"]
        recs = [dict(r, index=r.get("index", k)) for k, r in zip(result["finished"], result["records"]) if r]
        acc = sum(1 for r in recs if r.get("accepted"))
        ratio = [r["loss_after"] / r["loss_before"] for r in recs if r.get("loss_before")]
        s = self._settings
        n_all = len(result["blocks"])
        what = (f"{len(recs)} of {n_all} blocks" if result.get("cancelled") else
                f"{len(recs)} block{'s' if len(recs) != 1 else ''}")
        self.project.replace_config(
            cfg, f"Calibrate ({s.method}, {what}{'; cancelled' if result.get('cancelled') else ''})")
        if result.get("cancelled"):
            self.last_message = (f"Calibration cancelled after {len(recs)} of {n_all} blocks; the finished "
                                 f"block{'s are' if len(recs) != 1 else ' is'} applied "
                                 f"({describe_blocks([r['index'] for r in recs])}: {acc} accepted). "
                                 "Undo (Ctrl+Z) removes them.")
        else:
            self.last_message = (f"Calibrated {what} in {fmt_seconds(result['seconds'])}: {acc} accepted"
                                 + (f", mean loss ratio after/before {np.mean(ratio):.3f}" if ratio else "")
                                 + ". Undo (Ctrl+Z) restores the previous configuration.")
        self.summary.setText(self.last_message.split(". Undo")[0] + ".")
        self.bar.idle(self.last_message, done=not result.get("cancelled"))
        self.plot_blocks(recs)
        if not self.losses and s.method == "adam" and s.steps > 0 and not result.get("cancelled"):
            self.loss_plot.getPlotItem().setTitle(
                "Training loss: no steps this run (blocks resumed from a stopped run)", size="10pt")
        self.window.show_status(self.last_message)
        self.finished.emit("cancelled" if result.get("cancelled") else "done")

    def _failed(self, message: str) -> None:
        self._finish()
        if message == "cancelled":
            self.last_message = ("Calibration cancelled before any block finished; the configuration is "
                                 "unchanged.")
            self.bar.idle(self.last_message)
            self.window.show_status(self.last_message)
            self.plot_blocks([])
            self.finished.emit("cancelled")
        else:
            self.last_message = f"Calibration failed: {message}"
            self.bar.idle(self.last_message)
            self.window.show_error(self.last_message)
            self.plot_blocks(self.block_records)
            self.finished.emit("failed")

    def plot_blocks(self, recs: list, running: bool = False) -> None:
        """Loss before (red) and after (green) per block, log scale. With nothing to show yet: a
        note instead of bare axes and an empty legend (during a run the block axis already spans
        the blocks being calibrated)."""
        pi = self.block_plot.getPlotItem()
        pi.clear()
        recs = [r for r in recs if r.get("loss_before", 0) > 0 and r.get("loss_after", 0) > 0]
        span = self._todo if running and self._todo else [int(r["index"]) for r in recs]
        pi.showAxis("bottom", bool(span))
        pi.showAxis("left", bool(recs))
        if span:
            lo, hi = min(span), max(span)
            step = max(1, int(np.ceil((hi - lo + 1) / 15)))
            pi.getAxis("bottom").setTickSpacing(step, step)
            pi.setXRange(lo - 0.5, hi + 0.5, padding=0.02)
        if not recs:
            set_legend(self.block_plot, [])
            note = ("Each block's loss appears here as soon as the block finishes." if running else
                    "Each block's loss before and after calibration appears here during a run.")
            t = pg.TextItem(note, color=theme.muted(), anchor=(0.5, 0.5))
            pi.addItem(t)
            if not span:
                pi.setXRange(0, 1, padding=0)
            pi.setYRange(0, 1, padding=0)
            (x0, x1), _ = pi.getViewBox().viewRange()
            t.setPos((x0 + x1) / 2, 0.5)
            self._empty_note = t
            return
        self._empty_note = None
        xs = np.array([r["index"] for r in recs], dtype=float)
        before = np.array([r["loss_before"] for r in recs], dtype=float)
        after = np.array([r["loss_after"] for r in recs], dtype=float)
        # a thin segment from before to after per block; no line across blocks (they differ in scale)
        seg_x = np.repeat(xs, 3)
        seg_y = np.column_stack([before, after, np.full(len(xs), np.nan)]).ravel()
        pi.addItem(pg.PlotDataItem(seg_x, seg_y, pen=pg.mkPen(theme.muted(), width=1), connect="finite"))
        pi.addItem(pg.PlotDataItem(xs, before, pen=None, symbol="o", symbolSize=7, symbolBrush=BEFORE_COLOR,
                                   symbolPen=None))
        pi.addItem(pg.PlotDataItem(xs, after, pen=None, symbol="s", symbolSize=7, symbolBrush=AFTER_COLOR,
                                   symbolPen=None))
        rejected = sum(1 for r in recs if not r.get("accepted"))
        set_legend(self.block_plot, [("o", BEFORE_COLOR, "before"), ("s", AFTER_COLOR, "after")]
                   + ([("", theme.muted(), f"{rejected} rejected (kept as before)")] if rejected else []))
        pi.enableAutoRange(axis="y")
