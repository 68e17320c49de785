"""Roofline tab: the chosen hardware profile's roofline (bandwidth slope and compute ceilings,
log–log) with the configuration's predicted points under the three cache assumptions for the
replicas' shared codes (decision 13), and predicted vs measured decode latency."""
from __future__ import annotations

import importlib.util
import math
from typing import Optional

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
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

from dupstudio.core.jobs import DupstudioError
from dupstudio.gui import tasks
from dupstudio.gui.project import Project, baseline_config, predict, snapshot
from dupstudio.gui.widgets import ASSUMPTION_COLORS, ASSUMPTION_LABELS, JobBar, log_ticks, make_plot, placeholder

ASSUMPTIONS = ("cache", "measured", "dram")
MACHINE = "machine"
GROUPS = ("config", "baseline", "float16")
GROUP_LABELS = {"config": "this configuration", "baseline": "K = 1, same bits", "float16": "float weights"}


def machine_profile_available() -> bool:
    return importlib.util.find_spec("dupstudio.core.machine_profile") is not None


class RooflinePanel(QWidget):
    measured_ready = Signal(dict)

    def __init__(self, project: Project, window, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.project, self.window = project, window
        self.results: dict = {}
        self.measured: dict = {}  # group -> ms/token on this machine (for this revision)
        self._measured_rev = None
        self._dirty = True
        self._jobs: list = []

        lay = QVBoxLayout(self)
        row = QHBoxLayout()
        row.addWidget(QLabel("Hardware profile"))
        self.profile = QComboBox()
        self.profile.setMinimumWidth(260)
        row.addWidget(self.profile)
        row.addSpacing(10)
        row.addWidget(QLabel("Context (tokens in the KV cache)"))
        self.context = QSpinBox()
        self.context.setRange(0, 131072)
        self.context.setValue(512)
        self.context.setSingleStep(256)
        row.addWidget(self.context)
        row.addSpacing(10)
        self.measure_button = QPushButton("Measure decode here")
        self.measure_button.setToolTip("Decode 48 tokens on this machine (deploy mode) for the configuration, "
                                       "its K = 1 baseline and the float model")
        self.measure_button.clicked.connect(self.measure)
        row.addWidget(self.measure_button)
        self.machine_button = QPushButton("Profile this machine")
        self.machine_button.setToolTip("Run the machine micro-benchmark (bandwidth, peaks, second-pass ratio)")
        self.machine_button.clicked.connect(self.measure_machine)
        row.addWidget(self.machine_button)
        row.addStretch(1)
        lay.addLayout(row)
        self.bar = JobBar("Cancel")
        self.bar.cancel_clicked.connect(self.cancel)
        lay.addWidget(self.bar)
        self.note = QLabel("")
        self.note.setWordWrap(True)
        self.note.setStyleSheet("QLabel { color: #555; }")
        lay.addWidget(self.note)

        plots = QHBoxLayout()
        self.roof_plot = make_plot("", "arithmetic intensity (FLOP / byte)", "attainable (GFLOP/s)",
                                   log_x=True, log_y=True, legend=True, legend_at="bottom-right")
        self.bar_plot = make_plot("Decode latency per token: predicted vs measured (log scale)", "",
                                  "ms per token", legend=True, legend_at="left")
        plots.addWidget(self.roof_plot, 3)
        plots.addWidget(self.bar_plot, 2)
        lay.addLayout(plots, 1)

        self.table = QTableWidget(0, 10)
        self.table.setObjectName("rooflineTable")
        self.table.setHorizontalHeaderLabels(["Configuration", "Assumption", "MB / token", "GFLOP / token",
                                              "Passes", "Bandwidth ms", "Compute ms", "Floor ms",
                                              "Predicted ms", "Tokens / s"])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.table.verticalHeader().setDefaultSectionSize(22)
        self.table.setFixedHeight(self.table.horizontalHeader().sizeHint().height() + 6 * 22 + 4)
        lay.addWidget(self.table)

        self._fill_profiles()
        self.profile.currentIndexChanged.connect(self._profile_changed)
        self.context.valueChanged.connect(lambda _v: self.refresh())
        project.config_replaced.connect(self._config_changed)
        project.blocks_changed.connect(lambda _r: self._config_changed())
        project.model_changed.connect(self._config_changed)
        placeholder(self.roof_plot, "open a model")

    # ------------------------------------------------------------------ profiles
    def _fill_profiles(self) -> None:
        from dupstudio.core import roofline as RF

        self.profile.blockSignals(True)
        self.profile.clear()
        try:
            doc = RF.load_profiles_doc()
            default = doc["default"]
            names = [default] + sorted(n for n in doc["profiles"] if n != default)
            for n in names:
                self.profile.addItem(doc["profiles"][n].get("label", n), n)
        except DupstudioError as e:
            self.note.setText(f"Hardware profiles: {e}")
        self.profile.addItem("This machine (measured)", MACHINE)
        i = self.profile.count() - 1
        if not machine_profile_available():
            self.profile.model().item(i).setEnabled(False)
            self.profile.setItemData(i, "not available yet: dupstudio.core.machine_profile is missing",
                                     Qt.ToolTipRole)
            self.machine_button.setEnabled(False)
            self.machine_button.setToolTip("not available yet: dupstudio.core.machine_profile is missing")
        saved = self.window.settings.value("roofline/profile", "")
        j = self.profile.findData(saved) if saved else -1
        self.profile.setCurrentIndex(j if j >= 0 else 0)
        self.profile.blockSignals(False)

    def current_profile(self):
        from dupstudio.core import roofline as RF

        return RF.get_profile(self.profile.currentData())

    def _profile_changed(self) -> None:
        self.window.settings.setValue("roofline/profile", self.profile.currentData())
        self.refresh()

    # ------------------------------------------------------------------ predictions
    def _config_changed(self) -> None:
        self._dirty = True
        if self.isVisible():
            self.refresh()

    def showEvent(self, ev) -> None:  # noqa: N802
        super().showEvent(ev)
        if self._dirty:
            self.refresh()

    def refresh(self) -> None:
        p = self.project
        if p.config is None or p.shape is None:
            return
        self._dirty = False
        try:
            prof = self.current_profile()
        except DupstudioError as e:
            self.note.setText(str(e))
            return
        ctx = self.context.value()
        try:
            from dupstudio.core import roofline as RF

            base = baseline_config(p.config)

            self.results = {
                "config": predict(p.config, p.shape, prof, label="this configuration", context=ctx),
                "baseline": predict(base, p.shape, prof, label="K = 1, same bits", context=ctx),
                "float16": RF.predict(p.shape, RF.uniform_plan(p.shape, 16), prof, context=ctx, label="float16"),
            }
        except DupstudioError as e:
            self.note.setText(f"Roofline: {e}")
            return
        self.profile_obj = prof
        est = [n for n in ("bandwidth_gbs", "quantized_matmul_tflops", "layer_floor_us",
                           "second_pass_ratio_in_cache") if prof.is_estimate(n)]
        self.note.setText(
            f"{prof.label}: {prof.bandwidth_gbs:g} GB/s, {prof.float_tflops:g} TFLOPS ({prof.compute_dtype}), "
            f"quantized matmul {prof.quantized_matmul_tflops:g} TFLOPS, {prof.cache_name} {prof.cache_mb:g} MiB, "
            f"floor {prof.layer_floor_us:g} µs per layer pass."
            + (f" Estimated figures: {', '.join(est)}." if est else "")
            + " Points: decode ● and prefill ■ of this configuration; hollow: the K = 1 baseline.")
        self.draw_roofline(prof)
        self.draw_bars()
        self.fill_table()

    def draw_roofline(self, prof) -> None:
        from dupstudio.core import roofline as RF

        res = [self.results["config"], self.results["baseline"]]
        probe = RF.roofline_curve(prof, res)
        ints = [q["intensity"] for q in probe["points"] if q["intensity"] > 0 and math.isfinite(q["intensity"])]
        lo_x = 10 ** math.floor(math.log10(min(ints + [0.1])) - 0.3)
        hi_x = 10 ** math.ceil(math.log10(max(ints + [1e3])) + 0.3)
        c = RF.roofline_curve(prof, res, min_intensity=lo_x, max_intensity=hi_x)
        pi = self.roof_plot.getPlotItem()
        pi.clear()
        pi.setTitle(f"Roofline: {prof.label} ({self.context.value()} tokens of context)", size="10pt")
        x = np.asarray(c["intensity"])
        pi.addItem(pg.PlotDataItem(x, np.asarray(c["nominal"]) / 1e9, pen=pg.mkPen("#999", width=1.5,
                                   style=Qt.DashLine), name="nominal bandwidth, float peak"))
        pi.addItem(pg.PlotDataItem(x, np.asarray(c["attainable"]["float"]) / 1e9,
                                   pen=pg.mkPen("#1f77b4", width=2), name="float path (achievable)"))
        pi.addItem(pg.PlotDataItem(x, np.asarray(c["attainable"]["quantized"]) / 1e9,
                                   pen=pg.mkPen("#9467bd", width=2), name="quantized matmul path"))
        for a in ASSUMPTIONS:
            for label, hollow in (("this configuration", False), ("K = 1, same bits", True)):
                for phase, sym in (("decode", "o"), ("prefill", "s")):
                    pts = [q for q in c["points"] if q["label"] == label and q["assumption"] == a
                           and q["phase"] == phase]
                    if not pts:
                        continue
                    color = ASSUMPTION_COLORS[a]
                    name = f"{ASSUMPTION_LABELS[a]}" if (not hollow and phase == "decode") else None
                    # PlotDataItem (not ScatterPlotItem): it follows the plot's log mode
                    pi.addItem(pg.PlotDataItem(
                        [q["intensity"] for q in pts], [q["achieved_flops"] / 1e9 for q in pts], pen=None,
                        symbol=sym, symbolSize=11 if not hollow else 9,
                        symbolPen=pg.mkPen(color, width=1.8),
                        symbolBrush=None if hollow else pg.mkBrush(color), name=name))
        for path, color in (("float", "#1f77b4"), ("quantized", "#9467bd")):
            ridge = c["ridge_intensity"][path]
            t = pg.TextItem(f"ridge {ridge:.0f}", color=color, anchor=(0.5, 1.2))
            pi.addItem(t)
            t.setPos(math.log10(ridge), math.log10(c["peak_flops"][path] / 1e9))
        pi.setXRange(math.log10(lo_x), math.log10(hi_x), padding=0.02)
        ys = [v / 1e9 for v in c["nominal"] if v > 0]
        pts = [q["achieved_flops"] / 1e9 for q in c["points"]]
        lo = min(min(ys), min(pts) if pts else min(ys))
        hi = max(c["peak_flops"].values()) / 1e9
        pi.setYRange(math.log10(lo) - 0.3, math.log10(hi) + 0.4, padding=0)

    def draw_bars(self) -> None:
        """Grouped bars on a log scale (predictions on a laptop GPU profile and a measurement on this
        CPU differ by orders of magnitude), each labelled with its value."""
        pi = self.bar_plot.getPlotItem()
        pi.clear()
        width = 0.2
        measured_here = bool(self.measured) and self._measured_rev == self.project.revision
        offsets = {"cache": -1.5 * width, "measured": -0.5 * width, "dram": 0.5 * width, "here": 1.5 * width}
        if not measured_here:
            offsets = {"cache": -width, "measured": 0.0, "dram": width}
        series = []
        for a in ASSUMPTIONS:
            series.append((f"predicted, {ASSUMPTION_LABELS[a]}", ASSUMPTION_COLORS[a],
                           [(gi + offsets[a], self.results[g].decode[a].predicted_ms) for gi, g in enumerate(GROUPS)]))
        if measured_here:
            pts = [(gi + offsets["here"], self.measured.get(g)) for gi, g in enumerate(GROUPS)]
            series.append(("measured on this machine", "#444",
                           [(x, v) for x, v in pts if v is not None and math.isfinite(v) and v > 0]))
        values = [v for _n, _c, pts in series for _x, v in pts if v > 0]
        base = math.floor(math.log10(min(values))) if values else 0
        top = math.log10(max(values)) if values else 1
        for name, color, pts in series:
            if not pts:
                continue
            xs = [x for x, _ in pts]
            hs = [math.log10(v) - base for _, v in pts]
            pi.addItem(pg.BarGraphItem(x=xs, y0=base, height=hs, width=width * 0.95, brush=color, pen=None,
                                       name=name))
            for x, v in pts:
                t = pg.TextItem(f"{v:.3g}", color="#222", anchor=(0.5, 1.0))
                f = t.textItem.font()
                f.setPointSize(7)
                t.setFont(f)
                pi.addItem(t)
                t.setPos(x, math.log10(v) + 0.01)
        y_hi = top + 0.35 + 0.25 * (top - base)
        pi.getAxis("left").setTicks([log_ticks(base, y_hi)])
        pi.getAxis("bottom").setTicks([[(i, GROUP_LABELS[g]) for i, g in enumerate(GROUPS)]])
        pi.setXRange(-0.6, len(GROUPS) - 0.4, padding=0)
        pi.setYRange(base - 0.02 * (y_hi - base), y_hi, padding=0)

    def fill_table(self) -> None:
        rows = []
        for g in ("config", "baseline"):
            r = self.results[g]
            for a in ASSUMPTIONS:
                e = r.decode[a]
                rows.append([GROUP_LABELS[g], a, f"{e.bytes / 1e6:.2f}", f"{e.flops / 1e9:.3f}", str(e.passes),
                             f"{e.bandwidth_ms:.3f}", f"{e.compute_ms:.3f}", f"{e.overhead_ms:.3f}",
                             f"{e.predicted_ms:.3f}", f"{e.tokens_per_s:.1f}"])
        self.table.setRowCount(len(rows))
        for i, row in enumerate(rows):
            for j, text in enumerate(row):
                item = QTableWidgetItem(text)
                item.setTextAlignment((Qt.AlignLeft if j < 2 else Qt.AlignRight) | Qt.AlignVCenter)
                self.table.setItem(i, j, item)

    # ------------------------------------------------------------------ measurements
    def measure(self) -> None:
        p = self.project
        if not p.has_model or any(j.active for j in self._jobs):
            return
        self.measured = {}
        rev = p.revision
        self._measured_rev = rev
        cfgs = {"config": snapshot(p.config), "baseline": baseline_config(p.config), "float16": None}
        self._jobs = []
        self.bar.running("Measuring decode latency on this machine…")
        for g, cfg in cfgs.items():
            # distinct cache keys: the baseline is not the project's configuration
            key = rev if g == "config" else -rev if g == "baseline" else None
            fn = tasks.measure_decode_job(p.loaded, cfg, key, self.window.build_cache)
            self._jobs.append(self.window.runner.submit(
                fn, name=f"measure {g}", on_progress=self.bar.progress,
                on_done=lambda r, g=g: self._measured(g, r), on_error=self._measure_failed))

    def _measured(self, group: str, r: dict) -> None:
        self.measured[group] = r["ms_per_token"]
        if all(g in self.measured for g in GROUPS):
            self.bar.idle("Measured on this machine: " + ", ".join(
                f"{GROUP_LABELS[g]} {self.measured[g]:.2f} ms/token" for g in GROUPS)
                + " (compare with the 'This machine' profile)", done=True)
            self.measured_ready.emit(dict(self.measured))
        if self.project.revision == self._measured_rev:
            self.draw_bars()

    def _measure_failed(self, message: str) -> None:
        for j in self._jobs:
            j.cancel()
        self.bar.idle("Measurement cancelled" if message == "cancelled" else f"Measurement failed: {message}")
        if message != "cancelled":
            self.window.show_error(f"Measurement failed: {message}")

    def measure_machine(self) -> None:
        self.bar.running("Profiling this machine…")
        self._jobs = [self.window.runner.submit(
            tasks.measure_machine_job(), name="machine profile", on_progress=self.bar.progress,
            on_done=self._machine_done, on_error=self._measure_failed)]

    def _machine_done(self, _prof) -> None:
        self.bar.idle("This machine is profiled.", done=True)
        self.profile.setCurrentIndex(self.profile.findData(MACHINE))
        self.refresh()

    def cancel(self) -> None:
        for j in self._jobs:
            j.cancel()
