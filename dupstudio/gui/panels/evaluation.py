"""Evaluation tab: perplexity (with a bootstrap interval), KL and top-1 agreement of the current
configuration against the float model; every run this session lands in a comparison table that
can be exported as CSV.

The text starts empty (the bundled text is the calibration text, and perplexity measured on the
text a configuration was calibrated on flatters it): the first run asks for one, and a warning
shows whenever the chosen text is the calibration text."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from dupstudio.gui import tasks, theme
from dupstudio.gui.project import Project, config_summary, snapshot
from dupstudio.gui.widgets import JobBar, PathEdit, fmt_float, install_copy, log_ticks, make_plot, placeholder, set_legend

def fmt_ppl(v) -> str:
    """A perplexity: 4 significant digits below 1,000, whole numbers with separators above."""
    if v is None or not math.isfinite(v):
        return "—"
    return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"


HEADERS = ["#", "Configuration", "Details", "Bits / weight", "Perplexity", "95% interval", "KL (nats)",
           "Top-1 agreement", "Windows × ctx", "Seconds"]
CSV_KEYS = ["run", "label", "details", "bits_per_weight", "ppl", "ppl_ci95_low", "ppl_ci95_high", "kl",
            "top1_agreement", "windows", "ctx", "tokens", "seconds", "text", "text_sha256", "mlx_version",
            "backend", "machine"]


class EvaluationPanel(QWidget):
    finished = Signal(str)

    def __init__(self, project: Project, window, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.project, self.window = project, window
        self.rows: list = []
        self.job = None

        lay = QVBoxLayout(self)
        top = QHBoxLayout()
        box = QGroupBox("Evaluation settings")
        box.setToolTip("The text is cut into non-overlapping windows from its start (no BOS token); "
                       "perplexity is averaged over every token of those windows")
        form = QFormLayout(box)
        self.text = PathEdit("Choose an evaluation text")
        self.text.edit.setPlaceholderText("choose a text that is not the calibration text…")
        form.addRow("Text file:", self.text)
        self.same_text = QLabel("")
        self.same_text.setObjectName("evalSameText")
        self.same_text.setWordWrap(True)
        self.same_text.setStyleSheet(theme.banner_css("warning"))
        self.same_text.hide()
        form.addRow(self.same_text)
        self.text.changed.connect(lambda _t: self.check_text())
        row = QHBoxLayout()
        self.windows = QSpinBox()
        self.windows.setRange(1, 100000)
        self.windows.setValue(16)
        self.ctx = QSpinBox()
        self.ctx.setRange(8, 32768)
        self.ctx.setValue(512)
        self.reference = QCheckBox("KL and top-1 agreement against full precision")
        self.reference.setChecked(True)
        for label, w in (("Windows", self.windows), ("Context", self.ctx)):
            row.addWidget(QLabel(label))
            row.addWidget(w)
            row.addSpacing(8)
        row.addWidget(self.reference)
        row.addStretch(1)
        form.addRow(row)
        top.addWidget(box, 1)
        side = QVBoxLayout()
        self.eval_button = QPushButton("Evaluate the configuration")
        self.eval_button.setMinimumHeight(32)
        self.eval_button.clicked.connect(lambda: self.start(full_precision=False))
        side.addWidget(self.eval_button)
        self.fp_button = QPushButton("Evaluate full precision")
        self.fp_button.clicked.connect(lambda: self.start(full_precision=True))
        side.addWidget(self.fp_button)
        side.addStretch(1)
        top.addLayout(side)
        lay.addLayout(top)

        self.bar = JobBar("Cancel")
        self.bar.cancel_clicked.connect(self.cancel)
        lay.addWidget(self.bar)

        body = QHBoxLayout()
        left = QVBoxLayout()
        self.table = QTableWidget(0, len(HEADERS))
        self.table.setObjectName("evalTable")
        self.table.setHorizontalHeaderLabels(HEADERS)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        hh = self.table.horizontalHeader()
        hh.setSectionResizeMode(QHeaderView.ResizeToContents)
        hh.setSectionResizeMode(2, QHeaderView.Stretch)
        self.table.setWordWrap(False)
        self.table.setTextElideMode(Qt.ElideRight)
        install_copy(self.table, lambda n: self.window.show_status(f"Copied {n} run{'s' if n != 1 else ''} "
                                                                   "(tab-separated)"))
        left.addWidget(self.table, 1)
        row = QHBoxLayout()
        self.export_button = QPushButton("Export CSV…")
        self.export_button.clicked.connect(self.export_dialog)
        row.addWidget(self.export_button)
        clear = QPushButton("Clear")
        clear.clicked.connect(self.clear)
        row.addWidget(clear)
        row.addStretch(1)
        left.addLayout(row)
        body.addLayout(left, 5)
        self.plot = make_plot("Perplexity of the runs (log scale)", "", "perplexity", legend=True)
        body.addWidget(self.plot, 2)
        lay.addLayout(body, 1)
        placeholder(self.plot, "no runs yet")
        project.model_changed.connect(self._sync)
        self._sync()

    # ------------------------------------------------------------------ the text
    def calibration_texts(self) -> list:
        """The texts this session calibrates on: the Calibration tab's and the bundled one."""
        from dupstudio.gui.panels.calibration import default_calibration_text

        out = []
        cal = getattr(self.window, "calibration", None)
        if cal is not None and cal.text.path():
            out.append(cal.text.path())
        d = default_calibration_text()
        if d:
            out.append(str(d))
        return out

    def is_calibration_text(self, path: str) -> bool:
        """``path`` is (the same file as, or has the same content as) a calibration text."""
        if not path:
            return False
        a = Path(path).expanduser()
        for c in self.calibration_texts():
            b = Path(c).expanduser()
            try:
                if a.resolve() == b.resolve():
                    return True
                if a.is_file() and b.is_file() and a.stat().st_size == b.stat().st_size \
                        and a.read_bytes() == b.read_bytes():
                    return True
            except OSError:
                continue
        return False

    def check_text(self) -> bool:
        """Show (or hide) the warning that the chosen text is the calibration text."""
        same = self.is_calibration_text(self.text.path())
        self.same_text.setText("⚠ This is the calibration text: a configuration calibrated on it will look "
                               "better here than on text it has not seen. Choose another text for a fair "
                               "comparison." if same else "")
        self.same_text.setVisible(same)
        return same

    def _sync(self) -> None:
        ok = self.project.has_model and not (self.job is not None and self.job.active)
        self.eval_button.setEnabled(ok)
        self.fp_button.setEnabled(ok)
        self.export_button.setEnabled(bool(self.rows))

    def start(self, full_precision: bool = False) -> bool:
        p = self.project
        if not p.has_model or (self.job is not None and self.job.active):
            return False
        path = self.text.path()
        if not path:
            path = self.window.ask_text_file("Choose an evaluation text")
            if not path:
                return False
            self.text.set_path(path)
        cfg = None if full_precision else snapshot(p.config)
        label = "full precision" if full_precision else self.config_label()
        details = ("float weights" if full_precision else config_summary(p.config))
        on_cal = self.check_text()
        if on_cal:
            label += " (on the calibration text)"
            self.window.show_status("Evaluating on the calibration text: the result flatters a calibrated "
                                    "configuration.")
        bpw = 16.0 if full_precision else self.window.totals.values.get("bits_per_weight", math.nan)
        self.bar.running("Evaluating…")
        self.job = self.window.runner.submit(
            tasks.evaluate_job(p.loaded, cfg, p.revision, self.window.build_cache, path, self.windows.value(),
                               self.ctx.value(), self.reference.isChecked()),
            name="evaluation", on_progress=self.bar.progress,
            on_done=lambda r: self._done(r, label, details, bpw),
            on_error=self._failed)
        self.window.settings.setValue("evaluation/text", path)
        self._sync()
        return True

    def config_label(self) -> str:
        """How a run of the current configuration is named: its file (and whether it was edited
        since it was saved), or "unsaved configuration"."""
        p = self.project
        if p.path is None:
            return "unsaved configuration"
        return f"{p.path.name} (edited)" if p.dirty else p.path.name

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def _done(self, r: dict, label: str, details: str, bpw: float) -> None:
        self.job = None
        prov = r.get("provenance", {})
        row = {"run": len(self.rows) + 1, "label": label, "details": details, "bits_per_weight": bpw,
               "ppl": r["ppl"], "ppl_ci95_low": r["ppl_ci95"][0], "ppl_ci95_high": r["ppl_ci95"][1],
               "kl": r.get("kl"), "top1_agreement": r.get("top1_agreement"), "windows": r["windows"],
               "ctx": r["ctx"], "tokens": r["tokens"], "seconds": r["seconds"], "text": r.get("text"),
               "text_sha256": prov.get("text_sha256"), "mlx_version": prov.get("mlx_version"),
               "backend": prov.get("backend"), "machine": prov.get("machine")}
        self.add_row(row)
        self.bar.idle(f"{label}: perplexity {fmt_ppl(r['ppl'])} "
                      f"(95 % interval {fmt_ppl(r['ppl_ci95'][0])} – {fmt_ppl(r['ppl_ci95'][1])}) "
                      f"in {r['seconds']:.1f} s", done=True)
        self._sync()
        self.finished.emit("done")

    def _failed(self, message: str) -> None:
        self.job = None
        self.bar.idle("Evaluation cancelled" if message == "cancelled" else f"Evaluation failed: {message}")
        if message != "cancelled":
            self.window.show_error(f"Evaluation failed: {message}")
        self._sync()
        self.finished.emit("cancelled" if message == "cancelled" else "failed")

    def add_row(self, row: dict) -> None:
        self.rows.append(row)
        r = self.table.rowCount()
        self.table.insertRow(r)
        pct = (lambda v: "—" if v is None else f"{100 * v:.1f} %")
        cells = [str(row["run"]), row["label"], row["details"], fmt_float(row["bits_per_weight"], 4),
                 fmt_ppl(row["ppl"]), f"{fmt_ppl(row['ppl_ci95_low'])} – {fmt_ppl(row['ppl_ci95_high'])}",
                 fmt_float(row["kl"], 4), pct(row["top1_agreement"]), f"{row['windows']} × {row['ctx']}",
                 f"{row['seconds']:.1f}"]
        for c, text in enumerate(cells):
            item = QTableWidgetItem(text)
            item.setTextAlignment((Qt.AlignLeft if c in (1, 2) else Qt.AlignRight) | Qt.AlignVCenter)
            if c == 2:
                item.setToolTip(text)
            self.table.setItem(r, c, item)
        self.update_plot()

    def update_plot(self) -> None:
        """One bar per run on a log scale, its 95 % interval, the value written inside the bar
        (never outside the axes), runs named in the legend row below."""
        pi = self.plot.getPlotItem()
        pi.clear()
        if not self.rows:
            set_legend(self.plot, [])
            return
        xs = np.arange(1, len(self.rows) + 1, dtype=float)
        ppl = np.array([max(r["ppl"], 1e-9) for r in self.rows])
        y = np.log10(ppl)
        lo = np.log10(np.maximum([r["ppl_ci95_low"] for r in self.rows], 1e-9))
        hi = np.log10(np.maximum([r["ppl_ci95_high"] for r in self.rows], 1e-9))
        base = float(min(y.min(), lo.min())) - 0.5  # every bar at least half a decade tall
        fp, cf = "#7f7f7f", "#1f77b4"
        brushes = [fp if r["label"] == "full precision" else cf for r in self.rows]
        pi.addItem(pg.BarGraphItem(x=xs, y0=base, height=y - base, width=0.6, brushes=brushes, pen=None))
        pi.addItem(pg.ErrorBarItem(x=xs, y=y, top=hi - y, bottom=y - lo, beam=0.2,
                                   pen=pg.mkPen(theme.colors()["axis_text"])))
        for x, v, yy in zip(xs, ppl, y):
            t = pg.TextItem(fmt_ppl(v), color="#ffffff", anchor=(0.5, 0.5))
            pi.addItem(t)
            t.setPos(x, (base + yy) / 2)
        top = float(max(hi.max(), y.max())) + 0.1
        pi.getAxis("left").setTicks([log_ticks(base, top)])
        pi.getAxis("bottom").setTicks([[(x, f"#{r['run']}") for x, r in zip(xs, self.rows)]])
        set_legend(self.plot, [("", "", f"#{r['run']} {r['label']}") for r in self.rows])
        pi.setYRange(base, top, padding=0)
        pi.setXRange(0.4, len(self.rows) + 0.6, padding=0)

    def clear(self) -> None:
        self.rows = []
        self.table.setRowCount(0)
        self.plot.getPlotItem().clear()
        set_legend(self.plot, [])
        self._sync()

    def export_csv(self, path: str) -> Path:
        path = Path(path)
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=CSV_KEYS)
            w.writeheader()
            for row in self.rows:
                w.writerow({k: row.get(k) for k in CSV_KEYS})
        return path

    def export_dialog(self) -> None:
        path = self.window.ask_save_path("Export the evaluation table", "evaluations.csv", "CSV files (*.csv)")
        if path:
            try:
                self.export_csv(path)
            except OSError as e:
                self.window.show_error(f"{path}: could not write ({e.strerror or e})")
                return
            self.window.show_status(f"Exported {len(self.rows)} runs to {path}")
