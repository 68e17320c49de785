"""Roofline tab: what the configuration's decode and prefill cost on some hardware.

Three views, each honest about where its numbers come from:

* **A hardware profile** (M1 Pro, …): that machine's roofline (bandwidth slope, float and
  quantized-matmul ceilings, log–log) with the configuration's predicted points under the three
  assumptions for the replicas' shared codes (re-read from cache, the measured re-read ratio, or
  from DRAM), and the predicted latency per token.
* **This machine**: the same from the micro-benchmark of this computer, plus the decode latency
  measured here, drawn as markers on the same axes as the predictions. Before the machine is
  measured the tab says so and offers "Measure now"; it never falls back to another profile.
* **Both**: the profile and this machine overlaid.

Numbers carry units and three significant digits; the legend sits below each chart, and the ridge
points are named there, so no label covers another.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QComboBox,
    QFrame,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QStackedLayout,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from dupstudio.core.jobs import DupstudioError
from dupstudio.gui import tasks, theme
from dupstudio.gui.project import Project, baseline_config, predict, snapshot
from dupstudio.gui.text import fmt_ms, fmt_si, sig3
from dupstudio.gui.widgets import (
    ASSUMPTION_COLORS,
    ASSUMPTION_LABELS,
    JobBar,
    install_copy,
    make_plot,
    set_legend,
)

ASSUMPTIONS = ("cache", "measured", "dram")
MACHINE = "machine"
MODES = ("profile", "machine", "both")
MODE_LABELS = {"profile": "A hardware profile", "machine": "This machine", "both": "Both overlaid"}
GROUPS = ("config", "baseline", "float16")
GROUP_LABELS = {"config": "this configuration", "baseline": "K = 1, same bits", "float16": "float weights"}
MEASURED_COLOR = "#222222"
ASSUMPTION_SHORT = {"cache": "codes from cache", "measured": "measured ratio", "dram": "codes from DRAM"}
PATH_COLORS = {"float": "#1f77b4", "quantized": "#9467bd"}
#: figure names of a profile as a person reads them
FIGURE_NAMES = {"bandwidth_gbs": "memory bandwidth", "fp32_tflops": "float32 throughput",
                "fp16_tflops": "float16 throughput", "quantized_matmul_tflops": "quantized matmul throughput",
                "cache_mb": "cache size", "achievable_bandwidth_fraction": "achievable bandwidth share",
                "layer_floor_us": "per-layer floor", "second_pass_ratio_in_cache": "cache re-read ratio",
                "second_pass_ratio_spill": "spilled re-read ratio"}
#: marker per hardware in the "both" view: the profile's points round, this machine's triangles
HW_SYMBOL = {"profile": "o", "machine": "t"}
HW_GLYPH = {"profile": "o", "machine": "t"}


def measured_color() -> str:
    """The measured markers: near-black on a light background, near-white on a dark one."""
    return "#dddddd" if theme.is_dark() else MEASURED_COLOR


def machine_profile_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("dupstudio.core.machine_profile") is not None


def hardware_name(prof, short: bool = False) -> str:
    """How the window names a profile: a measured one as "this machine (AMD EPYC, CPU)", a named
    one by its label ("Apple M1 Pro (16-core GPU)"; short: "Apple M1 Pro")."""
    import re

    label = str(prof.label)
    if prof.name in (MACHINE, "this-machine") or label.startswith("This machine"):
        if short:
            return "this machine"
        m = re.match(r"This machine \((.*)\)$", label)
        if not m:
            return "this machine"
        inner = m.group(1)
        b = re.match(r"(\w+) \((.*)\)$", inner)  # "cpu (AMD EPYC)": backend (device)
        return f"this machine ({b.group(2)}, {b.group(1).upper()})" if b else f"this machine ({inner})"
    return label.split(" (")[0] if short else label


def profile_summary(prof) -> str:
    """A profile's figures with units, three significant digits."""
    floor = fmt_si(prof.layer_floor_us * 1e-6, "s")
    return (f"memory {fmt_si(prof.bandwidth_gbs * 1e9, 'B/s')}, float {fmt_si(prof.float_tflops * 1e12, 'FLOP/s')} "
            f"({prof.compute_dtype}), quantized matmul {fmt_si(prof.quantized_matmul_tflops * 1e12, 'FLOP/s')}, "
            f"{prof.cache_name} {sig3(prof.cache_mb)} MiB, {floor} per layer pass")


class RooflinePanel(QWidget):
    measured_ready = Signal(dict)
    machine_ready = Signal(object)  # the measured HardwareProfile

    def __init__(self, project: Project, window, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.project, self.window = project, window
        self.results: dict = {}  # group -> RooflineResult on the named profile
        self.machine_results: dict = {}  # group -> RooflineResult on this machine's profile
        self.measured: dict = {}  # group -> ms/token measured here (for _measured_rev)
        self.machine_prof = None
        self.profile_obj = None
        self.latency_points: list = []  # (x, ms, description) of the latency chart, for the read-out
        self._measured_rev = None
        self._dirty = True
        self._jobs: list = []
        self._pending_decode = False

        lay = QVBoxLayout(self)
        row = QHBoxLayout()
        row.addWidget(QLabel("Show"))
        self.mode_group = QButtonGroup(self)
        self.mode_buttons = {}
        for i, m in enumerate(MODES):
            b = QRadioButton(MODE_LABELS[m])
            self.mode_group.addButton(b, i)
            self.mode_buttons[m] = b
            row.addWidget(b)
        self.mode_buttons["profile"].setChecked(True)
        row.addSpacing(12)
        self.profile_label = QLabel("Profile")
        row.addWidget(self.profile_label)
        self.profile = QComboBox()
        self.profile.setMinimumWidth(180)
        row.addWidget(self.profile)
        row.addSpacing(12)
        row.addWidget(QLabel("Context"))
        self.context = QSpinBox()
        self.context.setRange(0, 131072)
        self.context.setValue(512)
        self.context.setSingleStep(256)
        self.context.setSuffix(" tokens")
        self.context.setToolTip("Tokens already in the KV cache when a token is decoded")
        row.addWidget(self.context)
        row.addStretch(1)
        self.measure_button = QPushButton("Measure this machine")
        self.measure_button.setToolTip("Run the micro-benchmark of this computer (memory bandwidth, throughput, "
                                       "per-layer floor) and decode 48 tokens here with the configuration, its "
                                       "K = 1 baseline and the float model")
        self.measure_button.clicked.connect(self.measure_all)
        row.addWidget(self.measure_button)
        lay.addLayout(row)
        self.bar = JobBar("Cancel")
        self.bar.cancel_clicked.connect(self.cancel)
        lay.addWidget(self.bar)
        self.note = QLabel("")
        self.note.setObjectName("rooflineNote")
        self.note.setWordWrap(True)
        self.note.setTextFormat(Qt.RichText)
        self.note.setStyleSheet(theme.muted_css())
        lay.addWidget(self.note)

        # the charts, or (this machine, not measured yet) an invitation to measure
        self.stack = QStackedLayout()
        charts = QWidget()
        plots = QHBoxLayout(charts)
        plots.setContentsMargins(0, 0, 0, 0)
        self.roof_plot = make_plot("", "arithmetic intensity (FLOP / byte)", "attainable (FLOP/s)",
                                   log_x=True, log_y=True, legend=True)
        self.lat_plot = make_plot("Decode latency per token", "", "time per token (log scale)", log_y=True,
                                  legend=True)
        self.bar_plot = self.lat_plot  # the former bar chart's name
        for pl in (self.roof_plot, self.lat_plot):
            pl.getPlotItem().setMenuEnabled(False)
        right = QVBoxLayout()
        right.addWidget(self.lat_plot, 1)
        self.readout = QLabel("Point at a marker to read its value.")
        self.readout.setObjectName("latencyReadout")
        self.readout.setStyleSheet(theme.muted_css())
        right.addWidget(self.readout)
        plots.addWidget(self.roof_plot, 3)
        plots.addLayout(right, 2)
        self.stack.addWidget(charts)
        empty = QFrame()
        el = QVBoxLayout(empty)
        el.addStretch(1)
        self.empty_text = QLabel("")
        self.empty_text.setObjectName("machineNotMeasured")
        self.empty_text.setWordWrap(True)
        self.empty_text.setAlignment(Qt.AlignCenter)
        el.addWidget(self.empty_text)
        self.measure_now = QPushButton("Measure now")
        self.measure_now.setObjectName("measureNow")
        self.measure_now.setMinimumHeight(36)
        self.measure_now.setMinimumWidth(200)
        self.measure_now.clicked.connect(self.measure_all)
        el.addWidget(self.measure_now, 0, Qt.AlignHCenter)
        el.addStretch(2)
        self.stack.addWidget(empty)
        lay.addLayout(self.stack, 1)

        self.table = QTableWidget(0, 12)
        self.table.setObjectName("rooflineTable")
        self.table.setHorizontalHeaderLabels(["Hardware", "Configuration", "Assumption", "Bytes / token",
                                              "FLOP / token", "Passes", "Bandwidth", "Compute", "Floor",
                                              "Predicted", "Tokens / s", "Measured here"])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        hh = self.table.horizontalHeader()
        hh.setSectionResizeMode(QHeaderView.Stretch)
        for c in (0, 1, 2):
            hh.setSectionResizeMode(c, QHeaderView.ResizeToContents)
        self.table.verticalHeader().setDefaultSectionSize(22)
        self.table.setFixedHeight(self.table.horizontalHeader().sizeHint().height() + 6 * 22 + 4)
        install_copy(self.table)
        lay.addWidget(self.table)

        self._fill_profiles()
        self.profile.currentIndexChanged.connect(self._profile_changed)
        self.mode_group.idClicked.connect(lambda _i: self._mode_changed())
        self.context.valueChanged.connect(lambda _v: self.refresh())
        project.config_replaced.connect(self._config_changed)
        project.blocks_changed.connect(lambda _r: self._config_changed())
        project.model_changed.connect(self._config_changed)
        self.lat_plot.scene().sigMouseMoved.connect(self._hover_latency)
        self._load_machine()
        saved = str(self.window.settings.value("roofline/mode", "profile"))
        if saved in MODES:
            self.mode_buttons[saved].setChecked(True)
        self._sync_controls()

    # ------------------------------------------------------------------ profiles and modes
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
        saved = self.window.settings.value("roofline/profile", "")
        j = self.profile.findData(saved) if saved else -1
        self.profile.setCurrentIndex(j if j >= 0 else 0)
        self.profile.blockSignals(False)

    def _load_machine(self) -> None:
        if not machine_profile_available():
            self.machine_prof = None
            return
        from dupstudio.core import machine_profile as MP

        self.machine_prof = MP.load_cached()

    def mode(self) -> str:
        return MODES[max(self.mode_group.checkedId(), 0)]

    def set_mode(self, mode: str) -> None:
        self.mode_buttons[mode].setChecked(True)
        self._mode_changed()

    def _mode_changed(self) -> None:
        self.window.settings.setValue("roofline/mode", self.mode())
        self._sync_controls()
        self.refresh()

    def _sync_controls(self) -> None:
        m = self.mode()
        self.profile.setEnabled(m != "machine")
        self.profile_label.setEnabled(m != "machine")
        busy = any(j.active for j in self._jobs)
        self.measure_button.setEnabled(self.project.has_model and not busy and machine_profile_available())
        self.measure_now.setEnabled(self.measure_button.isEnabled())
        self.measure_button.setText("Measure this machine again" if self.machine_prof is not None
                                    else "Measure this machine")

    def current_profile(self):
        from dupstudio.core import roofline as RF

        return RF.get_profile(self.profile.currentData())

    def search_profile(self) -> Optional[str]:
        """The profile a budgeted search predicts latency on: this machine in its view (once
        measured), else the chosen named profile."""
        if self.mode() == "machine" and self.machine_prof is not None:
            return MACHINE
        return self.profile.currentData()

    def search_profile_label(self) -> str:
        return "this machine (as measured)" if self.search_profile() == MACHINE else self.profile.currentText()

    def _profile_changed(self) -> None:
        self.window.settings.setValue("roofline/profile", self.profile.currentData())
        self.refresh()

    # ------------------------------------------------------------------ predictions
    def _config_changed(self) -> None:
        self._dirty = True
        self._sync_controls()
        if self.isVisible():
            self.refresh()

    def showEvent(self, ev) -> None:  # noqa: N802
        super().showEvent(ev)
        if self._dirty:
            self.refresh()

    def _predict_all(self, prof) -> dict:
        from dupstudio.core import roofline as RF

        p = self.project
        ctx = self.context.value()
        base = baseline_config(p.config)
        return {
            "config": predict(p.config, p.shape, prof, label="this configuration", context=ctx),
            "baseline": predict(base, p.shape, prof, label="K = 1, same bits", context=ctx),
            "float16": RF.predict(p.shape, RF.uniform_plan(p.shape, 16), prof, context=ctx, label="float16"),
        }

    def measured_here(self) -> dict:
        """Decode latency measured on this machine for the current configuration (empty when it
        changed since)."""
        return dict(self.measured) if self.measured and self._measured_rev == self.project.revision else {}

    def refresh(self) -> None:
        p = self.project
        if p.config is None or p.shape is None:
            return
        self._dirty = False
        mode = self.mode()
        self.results, self.machine_results, self.profile_obj = {}, {}, None
        if mode in ("machine", "both") and self.machine_prof is None:
            self._show_not_measured()
            if mode == "machine":
                return
        try:
            if mode in ("profile", "both"):
                self.profile_obj = self.current_profile()
                self.results = self._predict_all(self.profile_obj)
            if mode in ("machine", "both") and self.machine_prof is not None:
                self.machine_results = self._predict_all(self.machine_prof)
        except DupstudioError as e:
            self.note.setText(f"Roofline: {e}")
            return
        self.stack.setCurrentIndex(0)
        self._write_note()
        self.draw_roofline()
        self.draw_latency()
        self.fill_table()

    def _show_not_measured(self) -> None:
        self.stack.setCurrentIndex(1)
        self.empty_text.setText(
            "<b>This machine has not been measured yet.</b><br><br>“Measure now” runs a short micro-benchmark "
            "of this computer (memory bandwidth, matrix throughput, the fixed cost of a layer) and decodes "
            "48 tokens with the configuration, its K = 1 baseline and the float model. Predictions and "
            "measurements then appear here on the same axes. No other machine's figures are shown meanwhile.")
        self.note.setText("")
        self.table.setRowCount(0)

    def _write_note(self) -> None:
        parts = []
        for prof, name in ((self.profile_obj, None), (self.machine_prof if self.machine_results else None,
                                                      "This machine")):
            if prof is None:
                continue
            est = [FIGURE_NAMES.get(n, n) for n in ("bandwidth_gbs", "quantized_matmul_tflops", "layer_floor_us",
                                                     "second_pass_ratio_in_cache") if prof.is_estimate(n)]
            when = prof.meta.get("date", "") if name else ""
            title = hardware_name(prof)
            title = title[:1].upper() + title[1:] + (f", measured {str(when)[:10]}" if when else "")
            parts.append(f"<b>{title}</b>: {profile_summary(prof)}."
                         + (f" Estimated, not measured: {', '.join(est)}." if est else ""))
        meas = self.measured_here()
        if self.mode() == "profile" and meas:
            parts.append("Latency measured on this computer is shown in the “This machine” and “Both” views "
                         "(beside this machine's predictions, not another computer's).")
        parts.append("Points: decode ● and prefill ■ of this configuration; hollow: the K = 1 baseline"
                     + ("; ◆ measured here." if meas and self.mode() != "profile" else "."))
        self.note.setText("<br>".join(parts))

    # ------------------------------------------------------------------ drawing
    def _sets(self) -> list:
        """(hardware key, profile, results) drawn in the current view."""
        out = []
        if self.results:
            out.append(("profile", self.profile_obj, self.results))
        if self.machine_results:
            out.append(("machine", self.machine_prof, self.machine_results))
        return out

    def draw_roofline(self) -> None:
        from dupstudio.core import roofline as RF

        pi = self.roof_plot.getPlotItem()
        pi.clear()
        sets = self._sets()
        if not sets:
            return
        both = len(sets) > 1
        ints, ys, legend = [], [], []
        meas = self.measured_here() if self.machine_results else {}
        for hw, prof, res in sets:
            probe = RF.roofline_curve(prof, [res["config"], res["baseline"]])
            ints += [q["intensity"] for q in probe["points"] if q["intensity"] > 0 and math.isfinite(q["intensity"])]
            ints += list(probe["ridge_intensity"].values())
        lo_x = 10 ** math.floor(math.log10(min(ints + [0.1])) - 0.3)
        hi_x = 10 ** math.ceil(math.log10(max(ints + [1e3])) + 0.3)
        for hw, prof, res in sets:
            c = RF.roofline_curve(prof, [res["config"], res["baseline"]], min_intensity=lo_x, max_intensity=hi_x)
            x = np.asarray(c["intensity"])
            style = Qt.SolidLine if hw == "profile" else Qt.DashLine
            who = f" ({hardware_name(prof, short=True)})" if both else ""
            for path, label in (("float", "float path"), ("quantized", "quantized matmul path")):
                y = np.asarray(c["attainable"][path])
                pi.addItem(pg.PlotDataItem(x, y, pen=pg.mkPen(PATH_COLORS[path], width=2, style=style)))
                ridge = c["ridge_intensity"][path]
                peak = c["peak_flops"][path]
                pi.addItem(pg.PlotDataItem([ridge], [peak], pen=None, symbol="o", symbolSize=7,
                                           symbolPen=pg.mkPen(PATH_COLORS[path], width=1.5), symbolBrush=None))
                legend.append(("line" if hw == "profile" else "dash", PATH_COLORS[path],
                               f"{label}{who}: peak {fmt_si(peak, 'FLOP/s')}, ridge {sig3(ridge)} FLOP/B"))
                ys += [v for v in y if v > 0]
            for a in ASSUMPTIONS:
                for label, hollow in (("this configuration", False), ("K = 1, same bits", True)):
                    for phase, sym in (("decode", HW_SYMBOL[hw]), ("prefill", "s")):
                        pts = [q for q in c["points"] if q["label"] == label and q["assumption"] == a
                               and q["phase"] == phase]
                        if not pts:
                            continue
                        color = ASSUMPTION_COLORS[a]
                        pi.addItem(pg.PlotDataItem(
                            [q["intensity"] for q in pts], [q["achieved_flops"] for q in pts], pen=None,
                            symbol=sym, symbolSize=11 if not hollow else 9, symbolPen=pg.mkPen(color, width=1.8),
                            symbolBrush=None if hollow else pg.mkBrush(color)))
                        ys += [q["achieved_flops"] for q in pts]
            if hw == "machine" and meas:
                pts = []
                for g in ("config", "baseline"):
                    ms = meas.get(g)
                    e = res[g].decode["measured"]
                    if ms and math.isfinite(ms) and ms > 0 and e.flops:
                        pts.append((e.intensity, e.flops / (ms * 1e-3)))
                if pts:
                    pi.addItem(pg.PlotDataItem([p_[0] for p_ in pts], [p_[1] for p_ in pts], pen=None, symbol="d",
                                               symbolSize=13, symbolPen=pg.mkPen(measured_color(), width=1.5),
                                               symbolBrush=pg.mkBrush(255, 255, 255, 0)))
                    ys += [p_[1] for p_ in pts]
        legend += [("o", ASSUMPTION_COLORS[a], ASSUMPTION_LABELS[a]) for a in ASSUMPTIONS]
        if both:
            legend += [(HW_GLYPH["profile"], theme.muted(), f"decode on {hardware_name(sets[0][1], True)}"),
                       (HW_GLYPH["machine"], theme.muted(), "decode on this machine")]
        if meas:
            legend.append(("d_hollow", measured_color(),
                           "decode measured here (FLOP / measured time)"))
        set_legend(self.roof_plot, legend)
        if both:
            titles = f"{hardware_name(sets[0][1], True)} (solid) and this machine (dashed)"
        else:
            titles = hardware_name(sets[0][1])
        pi.setTitle(f"Roofline: {titles}, {self.context.value()} tokens of context", size="10pt")
        pi.setXRange(math.log10(lo_x), math.log10(hi_x), padding=0.02)
        ys = [v for v in ys if v > 0 and math.isfinite(v)]
        pi.setYRange(math.log10(min(ys)) - 0.3, math.log10(max(ys)) + 0.4, padding=0)
        pi.getAxis("left").setLabel("attainable (FLOP/s)")
        _unit_ticks(pi.getAxis("left"), min(ys) / 2, max(ys) * 3, "FLOP/s")

    def draw_latency(self) -> None:
        """Predicted decode latency (one marker per cache assumption) and, for this machine, the
        measured one, per configuration, on one log axis."""
        pi = self.lat_plot.getPlotItem()
        pi.clear()
        sets = self._sets()
        meas = self.measured_here() if self.machine_results else {}
        both = len(sets) > 1
        self.latency_points = []
        offsets = {"cache": -0.12, "measured": 0.0, "dram": 0.12}
        shift = {"profile": -0.2, "machine": 0.12} if both else {"profile": 0.0, "machine": -0.08}
        for hw, prof, res in sets:
            for a in ASSUMPTIONS:
                xs, ys = [], []
                for gi, g in enumerate(GROUPS):
                    v = res[g].decode[a].predicted_ms
                    if v and math.isfinite(v) and v > 0:
                        x = gi + shift[hw] + offsets[a] * (0.6 if both else 1.0)
                        xs.append(x)
                        ys.append(v)
                        self.latency_points.append((x, v, f"{GROUP_LABELS[g]} · predicted on "
                                                          f"{hardware_name(prof)}, {ASSUMPTION_LABELS[a]}: "
                                                          f"{fmt_ms(v)} per token"))
                if xs:
                    pi.addItem(pg.PlotDataItem(xs, ys, pen=None, symbol=HW_SYMBOL[hw], symbolSize=10,
                                               symbolPen=pg.mkPen(ASSUMPTION_COLORS[a], width=1.5),
                                               symbolBrush=pg.mkBrush(ASSUMPTION_COLORS[a])))
        if meas:
            xs, ys = [], []
            for gi, g in enumerate(GROUPS):
                v = meas.get(g)
                if v and math.isfinite(v) and v > 0:
                    x = gi + (0.36 if both else 0.22)
                    xs.append(x)
                    ys.append(v)
                    self.latency_points.append((x, v, f"{GROUP_LABELS[g]} · measured on this machine: "
                                                      f"{fmt_ms(v)} per token"))
            if xs:
                color = measured_color()
                pi.addItem(pg.PlotDataItem(xs, ys, pen=None, symbol="d", symbolSize=13,
                                           symbolPen=pg.mkPen(color, width=1.5), symbolBrush=pg.mkBrush(color)))
        legend = [("o", ASSUMPTION_COLORS[a], f"predicted, {ASSUMPTION_LABELS[a]}") for a in ASSUMPTIONS]
        if both:
            legend += [(HW_GLYPH["profile"], theme.muted(), f"on {hardware_name(sets[0][1], True)}"),
                       (HW_GLYPH["machine"], theme.muted(), "on this machine")]
        if meas:
            legend.append(("d", measured_color(), "measured on this machine"))
        set_legend(self.lat_plot, legend)
        if sets:
            pi.setTitle("Decode latency per token: " + (
                "predicted and measured" if meas else f"predicted on {hardware_name(sets[0][1], True)}"), size="10pt")
        values = [v for _x, v, _t in self.latency_points]
        pi.getAxis("bottom").setTicks([[(i, GROUP_LABELS[g]) for i, g in enumerate(GROUPS)]])
        pi.setXRange(-0.55, len(GROUPS) - 0.45, padding=0)
        if values:
            lo, hi = min(values) / 1.6, max(values) * 1.6
            pi.setYRange(math.log10(lo), math.log10(hi), padding=0)
            _unit_ticks(pi.getAxis("left"), lo, hi, "s", scale=1e-3)

    def _hover_latency(self, pos) -> None:
        vb = self.lat_plot.getPlotItem().getViewBox()
        if not self.latency_points or not vb.sceneBoundingRect().contains(pos):
            return
        pt = vb.mapSceneToView(pos)
        best, dist = None, 1e9
        (x0, x1), (y0, y1) = vb.viewRange()
        for x, v, text in self.latency_points:
            d = ((x - pt.x()) / max(x1 - x0, 1e-9)) ** 2 + ((math.log10(v) - pt.y()) / max(y1 - y0, 1e-9)) ** 2
            if d < dist:
                best, dist = text, d
        if best is not None and dist < 0.004:
            self.readout.setText(best)

    def fill_table(self) -> None:
        rows = []
        meas = self.measured_here()
        for hw, prof, res in self._sets():
            for g in ("config", "baseline"):
                r = res[g]
                for a in ASSUMPTIONS:
                    e = r.decode[a]
                    here = fmt_ms(meas.get(g)) if hw == "machine" and a == "measured" and meas.get(g) else ""
                    rows.append([hardware_name(prof, short=True), GROUP_LABELS[g], ASSUMPTION_SHORT[a], fmt_si(e.bytes, "B"), fmt_si(e.flops, "FLOP"), str(e.passes),
                                 fmt_ms(e.bandwidth_ms), fmt_ms(e.compute_ms), fmt_ms(e.overhead_ms),
                                 fmt_ms(e.predicted_ms), sig3(e.tokens_per_s), here])
        self.table.setRowCount(len(rows))
        for i, row in enumerate(rows):
            for j, text in enumerate(row):
                item = QTableWidgetItem(text)
                item.setTextAlignment((Qt.AlignLeft if j < 3 else Qt.AlignRight) | Qt.AlignVCenter)
                if j == 2:
                    item.setToolTip(ASSUMPTION_LABELS[ASSUMPTIONS[i % 3]])
                self.table.setItem(i, j, item)

    # ------------------------------------------------------------------ measurements
    def measure_all(self) -> bool:
        """"Measure now": the machine's micro-benchmark, then decode latency of the configuration,
        its K = 1 baseline and the float model on this machine."""
        if not self.project.has_model or any(j.active for j in self._jobs) or not machine_profile_available():
            return False
        self._pending_decode = True
        self.measure_machine()
        return True

    def measure(self) -> bool:
        """Decode latency on this machine (deploy mode) of the configuration, its K = 1 baseline and
        the float model."""
        p = self.project
        if not p.has_model or any(j.active for j in self._jobs):
            return False
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
        self._sync_controls()
        return True

    def _measured(self, group: str, r: dict) -> None:
        self.measured[group] = r["ms_per_token"]
        if all(g in self.measured for g in GROUPS):
            self.bar.idle("Measured on this machine: " + ", ".join(
                f"{GROUP_LABELS[g]} {fmt_ms(self.measured[g])}" for g in GROUPS) + " per token", done=True)
            self._jobs = []
            self._sync_controls()
            self.measured_ready.emit(dict(self.measured))
            if self.project.revision == self._measured_rev:
                self.refresh()

    def _measure_failed(self, message: str) -> None:
        for j in self._jobs:
            j.cancel()
        self._jobs = []
        self._pending_decode = False
        self.bar.idle("Measurement cancelled" if message == "cancelled" else f"Measurement failed: {message}")
        if message != "cancelled":
            self.window.show_error(f"Measurement failed: {message}")
        self._sync_controls()

    def measure_machine(self) -> None:
        self.bar.running("Measuring this machine (micro-benchmark)…")
        self._jobs = [self.window.runner.submit(
            tasks.measure_machine_job(), name="machine profile", on_progress=self.bar.progress,
            on_done=self._machine_done, on_error=self._measure_failed)]
        self._sync_controls()

    def _machine_done(self, prof) -> None:
        self.machine_prof = prof
        self._jobs = []
        self.bar.idle("This machine is measured.", done=True)
        self.machine_ready.emit(prof)
        if self.mode() == "profile":
            self.set_mode("machine")
        if self._pending_decode:
            self._pending_decode = False
            self.measure()
        else:
            self.refresh()
        self._sync_controls()

    def cancel(self) -> None:
        self._pending_decode = False
        for j in self._jobs:
            j.cancel()


def _unit_ticks(axis, lo: float, hi: float, unit: str, scale: float = 1.0) -> None:
    """Log-axis ticks at decades (1-2-5 steps where decades alone give fewer than three) labelled
    with units: ``lo``/``hi`` in the plotted values; a tick's value × ``scale`` is shown in
    ``unit`` ("100 ms", "2 GFLOP/s")."""
    if not (lo > 0 and hi > lo):
        axis.setTicks(None)
        return
    a, b = math.log10(lo), math.log10(hi)

    def ticks(steps):
        out = []
        for e in range(int(math.floor(a)) - 1, int(math.ceil(b)) + 1):
            for m in steps:
                v = m * 10.0 ** e
                if lo <= v <= hi:
                    out.append((math.log10(v), _trim(fmt_si(v * scale, unit))))
        return out

    major = ticks((1,))
    if len(major) < 3:
        major = ticks((1, 2, 5))
    axis.setTicks([major, []])


def _trim(label: str) -> str:
    """"10.0 ms" -> "10 ms", "2.00 GFLOP/s" -> "2 GFLOP/s" (round tick values)."""
    num, _, unit = label.partition(" ")
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    return f"{num} {unit}"
