"""Small shared widgets and formatting helpers."""
from __future__ import annotations

import math
from typing import Optional

import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QFont
from PySide6.QtWidgets import (
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QToolButton,
    QWidget,
)

pg.setConfigOptions(antialias=True, background="w", foreground="k")

#: replica colours (replica 1 = primary)
REPLICA_COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
ASSUMPTION_COLORS = {"cache": "#2ca02c", "measured": "#ff7f0e", "dram": "#d62728"}
ASSUMPTION_LABELS = {"cache": "codes re-read from cache", "measured": "measured re-read ratio",
                     "dram": "codes re-read from DRAM"}


def fmt_bytes(n: float) -> str:
    if n is None or not math.isfinite(n):
        return "—"
    if n >= 1e9:
        return f"{n / 1e9:,.2f} GB"
    if n >= 1e5:
        return f"{n / 1e6:,.1f} MB"
    return f"{n / 1e3:,.1f} KB"


def fmt_params(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    return f"{n / 1e3:.1f} K"


def fmt_float(x: Optional[float], digits: int = 4) -> str:
    if x is None:
        return "—"
    try:
        if not math.isfinite(x):
            return "∞" if x > 0 else "—"
    except TypeError:
        return str(x)
    return f"{x:.{digits}g}"


def fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


class Banner(QFrame):
    """A closable message strip (errors stay until closed or replaced; info fades with the next one)."""

    STYLES = {
        "error": "QFrame#banner { background: #fdecea; border: 1px solid #e0a0a0; border-radius: 4px; }"
                 " QLabel { color: #8b0000; }",
        "info": "QFrame#banner { background: #e8f1fb; border: 1px solid #a8c6e8; border-radius: 4px; }"
                " QLabel { color: #1b3d66; }",
        "warning": "QFrame#banner { background: #fff6e0; border: 1px solid #e6c677; border-radius: 4px; }"
                   " QLabel { color: #6b4b00; }",
    }

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setObjectName("banner")
        lay = QHBoxLayout(self)
        lay.setContentsMargins(8, 4, 4, 4)
        self.label = QLabel("")
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        lay.addWidget(self.label, 1)
        close = QToolButton()
        close.setText("✕")
        close.setAutoRaise(True)
        close.setToolTip("Dismiss")
        close.clicked.connect(self.hide)
        lay.addWidget(close, 0, Qt.AlignTop)
        self.kind = "info"
        self.hide()

    def show_message(self, text: str, kind: str = "error") -> None:
        self.kind = kind
        self.setStyleSheet(self.STYLES.get(kind, self.STYLES["info"]))
        self.label.setText(text)
        self.show()

    def text(self) -> str:
        return self.label.text() if self.isVisible() else ""


class PathEdit(QWidget):
    """A file path line edit with a Browse… button."""

    changed = Signal(str)

    def __init__(self, caption: str, filter: str = "Text files (*.txt);;All files (*)",
                 parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.caption, self.filter = caption, filter
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.edit = QLineEdit()
        self.edit.setPlaceholderText("choose a text file…")
        self.edit.textChanged.connect(self.changed)
        lay.addWidget(self.edit, 1)
        b = QPushButton("Browse…")
        b.clicked.connect(self.browse)
        lay.addWidget(b)

    def browse(self) -> Optional[str]:
        f, _ = QFileDialog.getOpenFileName(self, self.caption, self.edit.text(), self.filter)
        if f:
            self.edit.setText(f)
        return f or None

    def path(self) -> str:
        return self.edit.text().strip()

    def set_path(self, p: str) -> None:
        self.edit.setText(str(p))


class JobBar(QWidget):
    """Progress bar + message + Cancel button for one panel's job."""

    cancel_clicked = Signal()

    def __init__(self, cancel_text: str = "Cancel", parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.bar.setTextVisible(False)
        self.bar.setMaximumWidth(260)
        self.bar.setMinimumWidth(160)
        lay.addWidget(self.bar)
        self.message = QLabel("")
        self.message.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        lay.addWidget(self.message, 1)
        self.cancel = QPushButton(cancel_text)
        self.cancel.setEnabled(False)
        self.cancel.clicked.connect(self.cancel_clicked)
        lay.addWidget(self.cancel)
        self.idle("")

    def running(self, message: str = "") -> None:
        self.bar.setRange(0, 0)
        self.cancel.setEnabled(True)
        self.message.setText(message)

    def progress(self, fraction: Optional[float], message: str) -> None:
        if fraction is None:
            self.bar.setRange(0, 0)
        else:
            self.bar.setRange(0, 1000)
            self.bar.setValue(int(max(0.0, min(1.0, fraction)) * 1000))
        if message:
            self.message.setText(message[:1].upper() + message[1:])

    def idle(self, message: str = "", done: bool = False) -> None:
        self.bar.setRange(0, 1000)
        self.bar.setValue(1000 if done else 0)
        self.cancel.setEnabled(False)
        self.message.setText(message)


def make_plot(title: str = "", x: str = "", y: str = "", *, log_x: bool = False, log_y: bool = False,
              legend: bool = False, legend_at: str = "right") -> pg.PlotWidget:
    w = pg.PlotWidget()
    item = w.getPlotItem()
    if title:
        item.setTitle(title, size="10pt")
    font = QFont()
    font.setPointSize(9)
    for side in ("left", "bottom"):
        ax = item.getAxis(side)
        ax.setTickFont(font)
        ax.setPen(pg.mkPen("#444"))
        ax.setTextPen(pg.mkPen("#222"))
        ax.enableAutoSIPrefix(False)
    if x:
        item.setLabel("bottom", x)
    if y:
        item.setLabel("left", y)
    item.showGrid(x=True, y=True, alpha=0.2)
    item.setLogMode(log_x, log_y)
    if legend:
        offset = {"right": (-10, 10), "left": (10, 10), "bottom-right": (-10, -10)}[legend_at]
        item.addLegend(offset=offset, labelTextSize="8pt", brush=pg.mkBrush(255, 255, 255, 215),
                       pen=pg.mkPen("#ccc"))
    w.setMinimumHeight(160)
    return w


def log_ticks(lo: float, hi: float) -> list:
    """Tick positions (log10 of the value) and labels for a manually log-scaled axis spanning
    log10 values ``lo`` .. ``hi``: powers of ten, plus 2 and 5 times them over short ranges."""
    steps = (1, 2, 5) if hi - lo < 1.6 else (1,)
    out = []
    for e in range(int(math.floor(lo)) - 1, int(math.ceil(hi)) + 2):
        for m in steps:
            v = m * 10.0 ** e
            x = math.log10(v)
            if lo - 1e-9 <= x <= hi + 1e-9:
                out.append((x, f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    return out


def placeholder(plot: pg.PlotWidget, text: str) -> pg.TextItem:
    """A centred grey note on an empty plot (removed with ``plot.clear()``)."""
    t = pg.TextItem(text, color="#777", anchor=(0.5, 0.5))
    plot.addItem(t)
    vb = plot.getPlotItem().getViewBox()
    r = vb.viewRange()
    t.setPos((r[0][0] + r[0][1]) / 2, (r[1][0] + r[1][1]) / 2)
    return t
