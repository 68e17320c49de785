"""Distributions tab: one matrix's weight histogram with every replica's grid levels, the weights
in the primary's code space, each replica's error histogram, and the per-block × per-matrix error
heat map. A strategy combo previews another scale/zero strategy without changing the configuration."""
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
from dupstudio.gui import tasks
from dupstudio.gui.project import Project, snapshot
from dupstudio.gui.widgets import REPLICA_COLORS, make_plot, placeholder


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
        self.matrix.addItems(list(MATRIX_NAMES))
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
        grid.addWidget(self.weights_plot, 0, 0)
        grid.addWidget(self.code_plot, 0, 1)
        grid.addWidget(self.error_plot, 1, 0)
        grid.addWidget(self.heat_plot, 1, 1)
        lay.addLayout(grid, 1)

        self.heat = _HeatImage()
        self.heat.clicked = self._heat_clicked
        self.heat_plot.addItem(self.heat)
        vb = self.heat_plot.getPlotItem().getViewBox()
        vb.invertY(True)
        vb.setMouseEnabled(False, False)
        self.heat_plot.getPlotItem().showGrid(False, False)
        self.heat_plot.getPlotItem().setLabel("bottom", "matrix")
        self.heat_bar = pg.ColorBarItem(values=(0, 1), colorMap=pg.colormap.get("inferno"),
                                        label="relative error (%)", interactive=False, width=14)
        self.heat_bar.setImageItem(self.heat, insert_in=self.heat_plot.getPlotItem())
        self.heat_data: Optional[np.ndarray] = None
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
        for s in Q.STRATEGIES:
            self.strategy.addItem(f"preview: {s}", s)
        i = self.strategy.findData(cur)
        self.strategy.setCurrentIndex(max(i, 0))
        self.strategy.blockSignals(False)

    def _config_replaced(self) -> None:
        n = self.project.num_blocks
        self.block.blockSignals(True)
        self.block.setRange(0, max(n - 1, 0))
        self.block.blockSignals(False)
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
        if 0 <= x < len(MATRIX_NAMES) and 0 <= y < self.project.num_blocks:
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
        self.info.setText(f"<span style='color:#8b0000'>{message}</span>")
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
            f"{stats}<br><span style='color:#555'>grid of row {d['row']}, group {d['group']}: {sb}</span>")

        wp = self.weights_plot.getPlotItem()
        wp.clear()
        wp.addItem(pg.PlotDataItem(d["weight_edges"], d["weight_counts"], stepMode="center", fillLevel=0,
                                   brush=(120, 120, 120, 90), pen=pg.mkPen("#555", width=1),
                                   name="all weights"))
        top = float(max(d["weight_counts"].max(), 1))
        gw = np.asarray(d["group_weights"])
        wp.addItem(pg.ScatterPlotItem(gw, np.full(gw.shape, -0.03 * top), symbol="t1", size=7,
                                      pen=None, brush=pg.mkBrush("#000"), name="chosen group's weights"))
        for i, lv in enumerate(d["levels"]):
            color = REPLICA_COLORS[i % 4]
            pen = pg.mkPen(color, width=1.6, style=Qt.SolidLine if i == 0 else Qt.DashLine)
            for x in lv:
                wp.addItem(pg.InfiniteLine(pos=x, angle=90, pen=pen))
            wp.addItem(pg.PlotDataItem([], [], pen=pen, name=f"replica {i + 1} levels"))
        wp.setYRange(-0.07 * top, top * 1.05, padding=0)
        lo, hi = d["weight_edges"][0], d["weight_edges"][-1]
        allx = [x for lv in d["levels"] for x in lv]
        wp.setXRange(min(lo, min(allx)), max(hi, max(allx)), padding=0.02)

        cp = self.code_plot.getPlotItem()
        cp.clear()
        cp.addItem(pg.PlotDataItem(d["code_edges"], d["code_counts"], stepMode="center", fillLevel=0,
                                   brush=(120, 120, 120, 90), pen=pg.mkPen("#555", width=1), name="weights"))
        for i, lv in enumerate(d["code_levels"]):
            pen = pg.mkPen(REPLICA_COLORS[i % 4], width=1.6, style=Qt.SolidLine if i == 0 else Qt.DashLine)
            for x in lv:
                if math.isfinite(x):
                    cp.addItem(pg.InfiniteLine(pos=x, angle=90, pen=pen))
            cp.addItem(pg.PlotDataItem([], [], pen=pen, name=f"replica {i + 1} (median over groups)"))
        cp.setXRange(d["code_edges"][0], d["code_edges"][-1], padding=0)

        ep = self.error_plot.getPlotItem()
        ep.clear()
        for i, counts in enumerate(d["error_counts"]):
            color = REPLICA_COLORS[i % 4]
            ep.addItem(pg.PlotDataItem(d["error_edges"], counts, stepMode="center",
                                       pen=pg.mkPen(color, width=1.5),
                                       fillLevel=0 if i == 0 else None,
                                       brush=(214, 39, 40, 40) if i == 0 else None,
                                       name=f"replica {i + 1}: {100 * d['stats'][i]['rel_fro']:.2f} %"))
        ep.setXRange(d["error_edges"][0], d["error_edges"][-1], padding=0)

    def update_heatmap(self) -> None:
        p = self.project
        n = p.num_blocks
        if n == 0:
            return
        data = np.full((len(MATRIX_NAMES), n), np.nan)
        for k in range(n):
            m = p.metrics_for(k)
            if m:
                for j, name in enumerate(MATRIX_NAMES):
                    data[j, k] = 100 * m["matrices"][name][0]["rel_fro"]
        self.heat_data = data
        finite = data[np.isfinite(data)]
        lo, hi = (float(finite.min()), float(np.percentile(finite, 98))) if finite.size else (0.0, 1.0)
        clipped = finite.size and float(finite.max()) > hi * 1.001
        if hi <= lo:
            hi = lo + 1e-6
        img = np.where(np.isfinite(data), data, lo)
        self.heat.setImage(img, autoLevels=False, levels=(lo, hi))
        self.heat_bar.setLevels((lo, hi))
        pi = self.heat_plot.getPlotItem()
        pi.getAxis("bottom").setTicks([[(j + 0.5, name.replace("_proj", "")) for j, name in enumerate(MATRIX_NAMES)]])
        step = max(1, int(math.ceil(n / 15)))
        pi.getAxis("left").setTicks([[(k + 0.5, str(k)) for k in range(0, n, step)]])
        pi.getViewBox().setRange(xRange=(0, len(MATRIX_NAMES)), yRange=(0, n), padding=0)
        missing = int(np.isnan(data).any(axis=0).sum())
        pi.setTitle("Relative weight error per block and matrix (primary replica)"
                    + (f" · {missing} pending" if missing else ""), size="10pt")
        self.heat_bar.getAxis("left").setLabel(
            f"rel. error (%), clipped at p98 (max {float(finite.max()):.0f})" if clipped else "relative error (%)")
