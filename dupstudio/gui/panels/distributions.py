"""Distributions tab: one matrix's weight histogram with every replica's grid levels, the weights
in the primary's code space, each replica's error histogram, and the per-block × per-matrix error
heat map. A strategy combo previews another scale/zero strategy without changing the configuration.

Legends sit below the charts (never over the histograms). The heat map's colours are absolute
(0 % up to a round top, labelled), blocks still being computed are drawn grey and hatched, and
pointing at a cell reads out its block, matrix and error."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from dupstudio.core.jobs import DupstudioError
from dupstudio.core.model_io import MATRIX_NAMES
from dupstudio.gui import tasks, theme
from dupstudio.gui.project import Project, snapshot
from dupstudio.gui.strategies import describe
from dupstudio.gui.widgets import ERROR_CMAP, REPLICA_COLORS, error_scale_top, make_plot, placeholder, set_legend


class _HeatImage(pg.ImageItem):
    clicked = None  # set per instance: callable(x, y)

    def mouseClickEvent(self, ev):  # noqa: N802
        if ev.button() == Qt.LeftButton and self.clicked is not None:
            p = ev.pos()
            self.clicked(int(math.floor(p.x())), int(math.floor(p.y())))
            ev.accept()
        else:
            super().mouseClickEvent(ev)


class DistributionsPanel(QWidget):
    detail_ready = Signal(dict)

    def __init__(self, project: Project, window, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.project, self.window = project, window
        self.detail: Optional[dict] = None
        self._job = None
        self._request = 0
        self.error: Optional[str] = None

        lay = QVBoxLayout(self)
        bar = QHBoxLayout()
        bar.addWidget(QLabel("Block"))
        self.block = QSpinBox()
        self.block.setRange(0, 0)
        bar.addWidget(self.block)
        bar.addWidget(QLabel("Matrix"))
        self.matrix = QComboBox()
        self.matrix.addItems(list(self._names()))
        bar.addWidget(self.matrix)
        bar.addSpacing(12)
        bar.addWidget(QLabel("Strategy"))
        self.strategy = QComboBox()
        self.strategy.setMinimumWidth(190)
        bar.addWidget(self.strategy)
        self.apply_strategy = QPushButton("Use for this block")
        self.apply_strategy.setToolTip("Set the previewed strategy on the block (undoable)")
        self.apply_strategy.clicked.connect(self._apply_strategy)
        bar.addWidget(self.apply_strategy)
        bar.addSpacing(12)
        bar.addWidget(QLabel("Grid of row"))
        self.row = QSpinBox()
        self.row.setRange(0, 0)
        bar.addWidget(self.row)
        bar.addWidget(QLabel("group"))
        self.group = QSpinBox()
        self.group.setRange(0, 0)
        bar.addWidget(self.group)
        self.auto_group = QPushButton("Typical")
        self.auto_group.setToolTip("Show the grid of a typical group (median range)")
        bar.addWidget(self.auto_group)
        self.largest_group = QPushButton("Largest |w|")
        self.largest_group.setToolTip("Show the grid of the group that holds the matrix's largest weight")
        bar.addWidget(self.largest_group)
        bar.addStretch(1)
        lay.addLayout(bar)

        self.info = QLabel("")
        self.info.setWordWrap(True)
        self.info.setTextFormat(Qt.RichText)
        lay.addWidget(self.info)

        grid = QGridLayout()
        self.weights_plot = make_plot("Weights, with each replica's grid levels for the chosen group",
                                      "weight", "count", legend=True)
        self.code_plot = make_plot("Weights in the primary's code space, (w − b) / s, all groups",
                                   "code", "count", legend=True)
        self.error_plot = make_plot("Quantization error per replica, Ŵ − W", "error", "count", legend=True)
        self.heat_plot = make_plot("Relative weight error per block and matrix (primary replica)", "", "block")
        heat_box = QVBoxLayout()
        heat_box.setSpacing(2)
        heat_box.addWidget(self.heat_plot, 1)
        self.heat_readout = QLabel("Point at a cell to read its error; click it to show that matrix.")
        self.heat_readout.setObjectName("heatReadout")
        self.heat_readout.setStyleSheet(theme.muted_css())
        heat_box.addWidget(self.heat_readout)
        grid.addWidget(self.weights_plot, 0, 0)
        grid.addWidget(self.code_plot, 0, 1)
        grid.addWidget(self.error_plot, 1, 0)
        grid.addLayout(heat_box, 1, 1)
        lay.addLayout(grid, 1)

        self.heat = _HeatImage()
        self.heat.clicked = self._heat_clicked
        self.heat_plot.addItem(self.heat)
        vb = self.heat_plot.getPlotItem().getViewBox()
        vb.invertY(True)
        vb.setMouseEnabled(False, False)
        self.heat_plot.getPlotItem().showGrid(False, False)
        self.heat_plot.getPlotItem().setLabel("bottom", "matrix")
        self.heat_bar = pg.ColorBarItem(values=(0, 100), colorMap=pg.colormap.get(ERROR_CMAP),
                                        label="relative error (%)", interactive=False, width=14)
        # not linked to the image (it is drawn in RGBA: grey for pending blocks), only placed beside it
        heat_pi = self.heat_plot.getPlotItem()
        heat_pi.layout.addItem(self.heat_bar, 2, 5)
        heat_pi.layout.setColumnFixedWidth(4, 5)
        self.heat_top = 100.0
        self.heat_pending: list = []  # hatched rectangles over blocks still being computed
        self.heat_data: Optional[np.ndarray] = None
        self.heat_plot.scene().sigMouseMoved.connect(self._heat_hover)
        for p in (self.weights_plot, self.code_plot, self.error_plot):
            placeholder(p, "open a model")

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(150)
        self._timer.timeout.connect(self.request)
        self.block.valueChanged.connect(self._selection_changed)
        self.matrix.currentIndexChanged.connect(self._selection_changed)
        self.strategy.currentIndexChanged.connect(lambda _i: self.schedule())
        self.row.valueChanged.connect(lambda _v: self.schedule(keep_group=True))
        self.group.valueChanged.connect(lambda _v: self.schedule(keep_group=True))
        self.auto_group.clicked.connect(lambda: self.schedule(keep_group=False))
        self.largest_group.clicked.connect(lambda: self.schedule(keep_group=False, pick="largest"))
        self._keep_group = False
        self._pick = "median"
        self._dirty = False

        project.config_replaced.connect(self._config_replaced)
        project.blocks_changed.connect(self._blocks_changed)
        project.metrics_changed.connect(lambda _rows: self.update_heatmap())
        self._fill_strategies()

    # ------------------------------------------------------------------ controls
    def _fill_strategies(self) -> None:
        from dupstudio.core import quant as Q

        cur = self.strategy.currentData()
        self.strategy.blockSignals(True)
        self.strategy.clear()
        p = self.project
        own = p.config.block_quant(self.block.value())[2] if p.config is not None else "minmax"
        self.strategy.addItem(f"block's setting ({own})", None)
        self.strategy.setItemData(0, describe("strategy", own), Qt.ToolTipRole)
        for s in Q.STRATEGIES:
            self.strategy.addItem(f"preview: {s}", s)
            self.strategy.setItemData(self.strategy.count() - 1, describe("strategy", s), Qt.ToolTipRole)
        i = self.strategy.findData(cur)
        self.strategy.setCurrentIndex(max(i, 0))
        self.strategy.blockSignals(False)

    def _names(self) -> tuple:
        """The matrix list of the open model's architecture (phi3's fused matrices are four)."""
        from dupstudio.core.adapters import of_shape

        return of_shape(self.project.shape).matrix_names if self.project.shape else MATRIX_NAMES

    def _config_replaced(self) -> None:
        n = self.project.num_blocks
        self.block.blockSignals(True)
        self.block.setRange(0, max(n - 1, 0))
        self.block.blockSignals(False)
        names = list(self._names())
        if [self.matrix.itemText(i) for i in range(self.matrix.count())] != names:
            self.matrix.blockSignals(True)
            self.matrix.clear()
            self.matrix.addItems(names)
            self.matrix.blockSignals(False)
        self._fill_strategies()
        self.update_heatmap()
        self.schedule()

    def _blocks_changed(self, rows: list) -> None:
        if self.block.value() in rows:
            self._fill_strategies()
            self.schedule(keep_group=True)
        self.update_heatmap()

    def _selection_changed(self, *_a) -> None:
        self._fill_strategies()
        self.schedule(keep_group=False)

    def show_block(self, k: int, matrix: Optional[str] = None) -> None:
        self.block.setValue(k)
        if matrix:
            self.matrix.setCurrentText(matrix)

    def _heat_clicked(self, x: int, y: int) -> None:
        if 0 <= x < len(self._names()) and 0 <= y < self.project.num_blocks:
            self.block.setValue(y)
            self.matrix.setCurrentIndex(x)

    def _apply_strategy(self) -> None:
        s = self.strategy.currentData()
        if s is None:
            return
        try:
            self.project.edit_blocks([self.block.value()], "strategy", s)
        except DupstudioError as e:
            self.window.show_error(str(e))
            return
        self.strategy.setCurrentIndex(0)

    # ------------------------------------------------------------------ the worker request
    def schedule(self, keep_group: bool = False, pick: str = "median") -> None:
        self._keep_group = keep_group
        self._pick = pick
        if self.isVisible():
            self._timer.start()
        else:
            self._dirty = True

    def showEvent(self, ev) -> None:  # noqa: N802
        super().showEvent(ev)
        if getattr(self, "_dirty", False):
            self._dirty = False
            self._timer.start()

    def request(self) -> None:
        p = self.project
        if not p.has_model:
            return
        k = self.block.value()
        if k >= p.num_blocks:
            return
        cfg = snapshot(p.config)
        preview = self.strategy.currentData()
        if preview is not None and preview != cfg.block_quant(k)[2]:
            b = cfg.blocks[k]
            b.strategy, b.strategy_args, b.calibration = preview, None, None
            for key in [key for key in cfg.tensors if key.startswith(f"b{k}.")]:
                del cfg.tensors[key]
        row = self.row.value() if self._keep_group else None
        group = self.group.value() if self._keep_group else None
        if self._job is not None and self._job.active:
            self._job.cancel()
        self._request += 1
        rid = self._request
        self._job = self.window.runner.submit(
            tasks.matrix_detail_job(p.loaded, cfg, k, self.matrix.currentText(), row, group, pick=self._pick),
            name="matrix detail",
            on_done=lambda d, rid=rid, pv=preview: self._on_detail(rid, d, pv),
            on_error=lambda msg, rid=rid: self._on_error(rid, msg))

    def _on_error(self, rid: int, message: str) -> None:
        if rid != self._request or message == "cancelled":
            return
        self.error = message
        self.info.setText(f"<span style='color:{theme.banner_colors('error')[2]}'>{message}</span>")
        self.window.show_error(message)

    def _on_detail(self, rid: int, d: dict, preview) -> None:
        if rid != self._request:
            return
        self.error = None
        self.detail = d
        for w, v, hi in ((self.row, d["row"], d["shape"][0] - 1), (self.group, d["group"], d["groups"] - 1)):
            w.blockSignals(True)
            w.setRange(0, hi)
            w.setValue(v)
            w.blockSignals(False)
        self.plot_detail(d, preview)
        self.detail_ready.emit(d)

    # ------------------------------------------------------------------ drawing
    def plot_detail(self, d: dict, preview=None) -> None:
        K = len(d["levels"])
        strat = preview or self.project.config.block_quant(d["block"])[2]
        stats = ", ".join(f"<span style='color:{REPLICA_COLORS[i % 4]}'>replica {i + 1}: "
                          f"{100 * s['rel_fro']:.2f} % ({s['sqnr_db']:.1f} dB)</span>"
                          for i, s in enumerate(d["stats"]))
        sb = "; ".join(f"r{i + 1}: s={s:.3g}, b={b:.3g}" for i, (s, b) in enumerate(d["scale_bias"]))
        if d.get("weight_outside"):
            sb += (f" · {d['weight_outside']} outlier weights beyond ±{d['weight_edges'][-1]:.3g} "
                   f"are not in the histogram")
        self.info.setText(
            f"<b>block {d['block']} · {d['matrix']}</b> {d['shape'][0]}×{d['shape'][1]} · {d['bits']}-bit, "
            f"group {d['group_size']}, {strat}{' (preview)' if preview else ''} · K = {K} · relative error "
            f"{stats}<br><span style='color:{theme.muted()}'>grid of row {d['row']}, group {d['group']}: {sb}</span>")

        fg = theme.colors()["axis_text"]
        hist_pen = pg.mkPen(theme.muted(), width=1)
        wp = self.weights_plot.getPlotItem()
        wp.clear()
        wp.addItem(pg.PlotDataItem(d["weight_edges"], d["weight_counts"], stepMode="center", fillLevel=0,
                                   brush=(120, 120, 120, 90), pen=hist_pen))
        top = float(max(d["weight_counts"].max(), 1))
        gw = np.asarray(d["group_weights"])
        wp.addItem(pg.ScatterPlotItem(gw, np.full(gw.shape, -0.03 * top), symbol="t1", size=7,
                                      pen=None, brush=pg.mkBrush(fg)))
        legend = [("box", "#888888", "all weights"), ("t", fg, "the chosen group's weights")]
        for i, lv in enumerate(d["levels"]):
            color = REPLICA_COLORS[i % 4]
            pen = pg.mkPen(color, width=1.6, style=Qt.SolidLine if i == 0 else Qt.DashLine)
            for x in lv:
                wp.addItem(pg.InfiniteLine(pos=x, angle=90, pen=pen))
            legend.append(("line" if i == 0 else "dash", color, f"replica {i + 1} grid levels"))
        set_legend(self.weights_plot, legend)
        wp.setYRange(-0.07 * top, top * 1.05, padding=0)
        lo, hi = d["weight_edges"][0], d["weight_edges"][-1]
        allx = [x for lv in d["levels"] for x in lv]
        wp.setXRange(min(lo, min(allx)), max(hi, max(allx)), padding=0.02)

        cp = self.code_plot.getPlotItem()
        cp.clear()
        cp.addItem(pg.PlotDataItem(d["code_edges"], d["code_counts"], stepMode="center", fillLevel=0,
                                   brush=(120, 120, 120, 90), pen=hist_pen))
        legend = [("box", "#888888", "weights of all groups")]
        for i, lv in enumerate(d["code_levels"]):
            color = REPLICA_COLORS[i % 4]
            pen = pg.mkPen(color, width=1.6, style=Qt.SolidLine if i == 0 else Qt.DashLine)
            for x in lv:
                if math.isfinite(x):
                    cp.addItem(pg.InfiniteLine(pos=x, angle=90, pen=pen))
            legend.append(("line" if i == 0 else "dash", color,
                           f"replica {i + 1} levels" + (" (median over groups)" if i else "")))
        set_legend(self.code_plot, legend)
        cp.setXRange(d["code_edges"][0], d["code_edges"][-1], padding=0)

        ep = self.error_plot.getPlotItem()
        ep.clear()
        legend = []
        for i, counts in enumerate(d["error_counts"]):
            color = REPLICA_COLORS[i % 4]
            ep.addItem(pg.PlotDataItem(d["error_edges"], counts, stepMode="center",
                                       pen=pg.mkPen(color, width=1.5),
                                       fillLevel=0 if i == 0 else None,
                                       brush=(214, 39, 40, 40) if i == 0 else None))
            legend.append(("line", color, f"replica {i + 1}: {100 * d['stats'][i]['rel_fro']:.2f} % relative error"))
        set_legend(self.error_plot, legend)
        ep.setXRange(d["error_edges"][0], d["error_edges"][-1], padding=0)

    def update_heatmap(self) -> None:
        """Block × matrix relative error on an absolute scale: 0 % up to the first round value
        above the largest error (labelled on the colour bar). Blocks whose error is still being
        computed are grey and hatched, never coloured as if they had the lowest error."""
        from PySide6.QtGui import QBrush, QColor, QPen
        from PySide6.QtWidgets import QGraphicsRectItem

        p = self.project
        n = p.num_blocks
        if n == 0:
            return
        data = np.full((len(self._names()), n), np.nan)
        for k in range(n):
            m = p.metrics_for(k)
            if m:
                for j, name in enumerate(self._names()):
                    data[j, k] = 100 * m["matrices"][name][0]["rel_fro"]
        self.heat_data = data
        finite = data[np.isfinite(data)]
        top = error_scale_top(float(finite.max())) if finite.size else 100.0
        self.heat_top = top
        cmap = pg.colormap.get(ERROR_CMAP)
        lut = cmap.getLookupTable(0.0, 1.0, 256, alpha=True)
        idx = np.clip(np.nan_to_num(data / top, nan=0.0), 0, 1) * 255
        rgba = lut[idx.astype(np.int64)].astype(np.ubyte)
        pending = np.isnan(data)
        grey = QColor(theme.colors()["pending"])
        rgba[pending] = (grey.red(), grey.green(), grey.blue(), 255)
        self.heat.setImage(rgba, autoLevels=False)
        self.heat_bar.setLevels((0.0, top))
        pi = self.heat_plot.getPlotItem()
        for r in self.heat_pending:
            pi.removeItem(r)
        self.heat_pending = []
        cols = np.where(pending.any(axis=0))[0]
        hatch = QBrush(QColor(theme.colors()["axis"]), Qt.BDiagPattern)
        for k in cols:  # a pending block is pending for every matrix: one hatched band per block
            rect = QGraphicsRectItem(0, float(k), float(len(self._names())), 1.0)
            rect.setBrush(hatch)
            rect.setPen(QPen(Qt.NoPen))
            pi.addItem(rect)
            self.heat_pending.append(rect)
        pi.getAxis("bottom").setTicks([[(j + 0.5, name.replace("_proj", "")) for j, name in enumerate(self._names())]])
        step = max(1, int(math.ceil(n / 15)))
        pi.getAxis("left").setTicks([[(k + 0.5, str(k)) for k in range(0, n, step)]])
        pi.getViewBox().setRange(xRange=(0, len(self._names())), yRange=(0, n), padding=0)
        missing = len(cols)
        pi.setTitle("Relative weight error per block and matrix (primary replica)"
                    + (f" · {missing} block{'s' if missing != 1 else ''} still computing (hatched)" if missing else ""),
                    size="10pt")
        self.heat_bar.getAxis("left").setLabel(f"relative error, 0 – {top:g} %")

    def heat_text(self, x: int, y: int) -> str:
        """The read-out of cell (matrix x, block y)."""
        if self.heat_data is None or not (0 <= x < len(self._names()) and 0 <= y < self.heat_data.shape[1]):
            return ""
        v = self.heat_data[x, y]
        what = f"block {y} · {self._names()[x]}"
        if not math.isfinite(v):
            return f"{what}: still being computed"
        m = self.project.metrics_for(y)
        sq = m["matrices"][self._names()[x]][0]["sqnr_db"] if m else None
        return f"{what}: relative error {v:.2f} %" + (f", SQNR {sq:.1f} dB" if sq is not None else "") + \
            " (click to show it above)"

    def _heat_hover(self, pos) -> None:
        vb = self.heat_plot.getPlotItem().getViewBox()
        if not vb.sceneBoundingRect().contains(pos):
            return
        pt = vb.mapSceneToView(pos)
        text = self.heat_text(int(math.floor(pt.x())), int(math.floor(pt.y())))
        if text:
            self.heat_readout.setText(text)
