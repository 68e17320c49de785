"""Per-block sensitivity (Tools ▸ Sensitivity…): bars per block of the KL when only that block is
quantized and of the KL a second, calibrated replica of that block removes; the values in a table;
"Set K = 2 on the top N blocks" applies the result to the layer table (one undoable step).

:class:`dupstudio.plots.SensitivityPlot` is also what ``dupstudio sensitivity`` renders into its PNG."""
from __future__ import annotations

import math
from typing import Optional

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from dupstudio.gui import theme
from dupstudio.gui.widgets import JobBar, fmt_float, fmt_seconds, install_copy
from dupstudio.plots import SensitivityPlot, _num

TABLE_COLUMNS = (("block", "Block", "decoder block"),
                 ("kl_quantized", "KL", "KL from full precision with only this block quantized "
                                        "(round to nearest)"),
                 ("kl_k1", "KL, K=1", "the same with this block calibrated (K = 1)"),
                 ("kl_k2", "KL, K=2", "the same with a second, calibrated replica of this block"),
                 ("kl_gain", "Gain", "KL removed by the second replica: KL K=1 − KL K=2"),
                 ("bits_per_weight", "bits/w", "bits per weight of this block at K = 1"),
                 ("bits_per_weight_k2", "bits/w K=2", "bits per weight of this block with the second replica"),
                 ("seconds", "s", "seconds this block took"))
#: columns the narrow dock leaves out (shown in the block's tooltip; Ctrl+C copies them too)
DOCK_HIDDEN = ("bits_per_weight", "bits_per_weight_k2", "seconds")

class _NumItem(QTableWidgetItem):
    """A table cell that sorts by its number (Qt.UserRole), NaN last."""

    def __lt__(self, other) -> bool:  # noqa: D105
        a, b = _num(self.data(Qt.UserRole)), _num(other.data(Qt.UserRole))
        if math.isnan(a) or math.isnan(b):
            return not math.isnan(a) and math.isnan(b)
        return a < b


class SensitivityPanel(QWidget):
    """The dock's contents: progress, the bars, the table, and "use the result"."""

    apply_requested = Signal(list, str)  # blocks, replica mode
    cancel_requested = Signal()

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.df = None
        self.mode = "serial"
        self.rows: list = []
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        self.bar = JobBar("Cancel")
        self.bar.cancel_clicked.connect(self.cancel_requested)
        lay.addWidget(self.bar)
        self.summary = QLabel("Tools ▸ Sensitivity… measures, block by block, the KL from full precision on "
                              "calibration text when only that block is quantized, and how much a second "
                              "calibrated replica of it removes.")
        self.summary.setWordWrap(True)
        self.summary.setStyleSheet(theme.muted_css())
        lay.addWidget(self.summary)
        split = QSplitter(Qt.Vertical)
        self.plot = SensitivityPlot()
        self.plot.setMinimumHeight(220)
        split.addWidget(self.plot)
        self.table = QTableWidget(0, len(TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels([t for _, t, _ in TABLE_COLUMNS])
        for c, (_, _, tip) in enumerate(TABLE_COLUMNS):
            self.table.horizontalHeaderItem(c).setToolTip(tip)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.verticalHeader().setVisible(False)
        hh = self.table.horizontalHeader()
        hh.setSectionResizeMode(QHeaderView.ResizeToContents)
        hh.setStretchLastSection(True)
        self.table.verticalHeader().setDefaultSectionSize(22)
        # the dock is narrow: the KL columns are shown; bits per weight and seconds stay in the
        # data (hover the block number; the CLI's sensitivity.csv has every column)
        for c, (key, _, _) in enumerate(TABLE_COLUMNS):
            if key in DOCK_HIDDEN:
                self.table.setColumnHidden(c, True)
        self.table.horizontalHeader().setSortIndicator(0, Qt.AscendingOrder)
        self.table.setSortingEnabled(True)
        install_copy(self.table, include_hidden=True)
        split.addWidget(self.table)
        split.setSizes([320, 200])
        lay.addWidget(split, 1)
        row = QHBoxLayout()
        row.addWidget(QLabel("Top"))
        self.top_n = QSpinBox()
        self.top_n.setRange(1, 4096)
        self.top_n.setValue(4)
        self.top_n.valueChanged.connect(lambda _v: self._sync())
        row.addWidget(self.top_n)
        self.apply_button = QPushButton("Set K = 2 on the top blocks by gain")
        self.apply_button.setToolTip("Give the blocks whose second replica removes the most KL a second replica "
                                     "(in the mode measured) in the layer table; Ctrl+Z undoes it")
        self.apply_button.clicked.connect(self._apply)
        row.addWidget(self.apply_button)
        row.addStretch(1)
        lay.addLayout(row)
        self._sync()

    # ------------------------------------------------------------------ running
    def started(self, message: str, mode: str) -> None:
        self.df = None
        self.mode = mode
        self.rows = []
        self.plot.set_rows([])
        self.table.setRowCount(0)
        self.bar.running(message)
        self._sync()

    def add_row(self, row: dict) -> None:
        """A finished block while the job runs (streamed)."""
        self.rows = [r for r in self.rows if r["block"] != row["block"]] + [dict(row)]
        self._show(self.rows)

    def show_result(self, df, title: str = "") -> None:
        self.df = df
        self.rows = df.to_dict("records")
        secs = df.attrs.get("seconds")
        self.bar.idle(f"{len(df)} block{'s' if len(df) != 1 else ''}"
                      + (f" in {fmt_seconds(secs)}" if secs is not None else ""), done=True)
        self.summary.setText(title)
        self._show(self.rows)

    def failed(self, message: str) -> None:
        self.bar.idle(message)
        self._sync()

    def _show(self, rows: list) -> None:
        self.plot.set_rows(sorted(rows, key=lambda r: r["block"]))
        self.table.setSortingEnabled(False)
        self.table.setRowCount(len(rows))
        for i, r in enumerate(sorted(rows, key=lambda r: r["block"])):
            for c, (key, _, _) in enumerate(TABLE_COLUMNS):
                v = r.get(key)
                if key == "block":
                    text = str(int(v))
                elif key == "seconds":
                    text = "—" if v is None or not math.isfinite(_num(v)) else f"{_num(v):.1f}"
                else:
                    text = fmt_float(None if v is None or not math.isfinite(_num(v)) else _num(v), 3)
                item = _NumItem(text)
                item.setData(Qt.UserRole, _num(v))
                if key == "block":
                    item.setToolTip(" · ".join(f"{t}: {fmt_float(_num(r.get(k)), 4)}" for k, t, _ in TABLE_COLUMNS
                                               if k in DOCK_HIDDEN and r.get(k) is not None))
                item.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
                self.table.setItem(i, c, item)
        self.table.setSortingEnabled(True)
        self._sync()

    # ------------------------------------------------------------------ using the result
    def top_blocks(self) -> list:
        from dupstudio.core.sensitivity import top_gain_blocks

        if self.df is None:
            return []
        return top_gain_blocks(self.df, self.top_n.value())

    def _apply(self) -> None:
        blocks = self.top_blocks()
        if blocks:
            self.apply_requested.emit(blocks, self.mode)

    def _sync(self) -> None:
        blocks = self.top_blocks()
        self.plot.mark(blocks)
        self.apply_button.setEnabled(bool(blocks))
        if self.df is not None and "kl_gain" not in self.df.columns:
            self.apply_button.setToolTip("Measured without a second replica: run again with it to rank blocks")
        self.apply_button.setText(f"Set K = 2 ({self.mode}) on the top {len(blocks)} block"
                                  f"{'s' if len(blocks) != 1 else ''} by gain" if blocks
                                  else "Set K = 2 on the top blocks by gain")
