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
    QScrollArea,
    QSizePolicy,
    QTabWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

pg.setConfigOptions(antialias=True, background="w", foreground="k")  # theme.apply() may switch to dark

#: replica colours (replica 1 = primary)
REPLICA_COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
ASSUMPTION_COLORS = {"cache": "#2ca02c", "measured": "#ff7f0e", "dram": "#d62728"}
ASSUMPTION_LABELS = {"cache": "codes re-read from cache", "measured": "measured re-read ratio",
                     "dram": "codes re-read from DRAM"}


def fmt_bytes(n: float) -> str:
    """Sizes as everywhere else in dupstudio (one unit convention: decimal)."""
    from dupstudio.core.units import human_bytes

    return human_bytes(n)


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
        from dupstudio.gui import theme

        self.kind = kind
        bg, border, fg = theme.banner_colors(kind)
        self.setStyleSheet(f"QFrame#banner {{ background: {bg}; border: 1px solid {border}; border-radius: 4px; }}"
                           f" QLabel {{ color: {fg}; }}")
        self.label.setText(text)
        self.show()

    def text(self) -> str:
        return self.label.text() if self.isVisible() else ""


class _Page(QWidget):
    """A tab page's holder in its scroll area. A page with word-wrapped labels reports a
    height-for-width, which the scroll area takes as the height it needs: that is the page's
    *preferred* height (plots at their preferred size), so a page would scroll although it fits.
    This holder answers with the minimum height instead."""

    def __init__(self, page: QWidget) -> None:
        super().__init__()
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(page)
        self.page = page

    def heightForWidth(self, width: int) -> int:  # noqa: N802
        return self.minimumSizeHint().height()


class ScrollingTabs(QTabWidget):
    """Tabs whose pages scroll when the window is smaller than a page's minimum size, so no page
    (nor a dock beside it) can push the window past the screen. ``addTab``, ``setCurrentWidget``,
    ``currentWidget`` and ``indexOf`` take and return the pages themselves, not their scroll areas."""

    def addTab(self, page, label: str) -> int:  # noqa: N802
        area = QScrollArea()
        area.setWidget(_Page(page))
        area.setWidgetResizable(True)
        area.setFrameShape(QFrame.NoFrame)
        area.setObjectName(f"scroll_{page.objectName() or label.lower()}")
        return super().addTab(area, label)

    def page(self, index: int):
        w = self.widget(index)
        if isinstance(w, QScrollArea):
            w = w.widget()
        return w.page if isinstance(w, _Page) else w

    def indexOf(self, page) -> int:  # noqa: N802
        for i in range(self.count()):
            if self.page(i) is page or self.widget(i) is page:
                return i
        return -1

    def setCurrentWidget(self, page) -> None:  # noqa: N802
        i = self.indexOf(page)
        if i >= 0:
            self.setCurrentIndex(i)

    def currentWidget(self):  # noqa: N802
        i = self.currentIndex()
        return self.page(i) if i >= 0 else None


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
        from pathlib import Path

        cur = Path(self.edit.text().strip()).expanduser() if self.edit.text().strip() else None
        start = str(cur.parent if cur is not None and cur.parent.is_dir() else Path.home())
        f, _ = QFileDialog.getOpenFileName(self, self.caption, start, self.filter)
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


class Plot(pg.PlotWidget):
    """A PlotWidget whose legend row (below the axes) re-wraps its entries to the width."""

    legend_label = None
    legend_entries: list = []

    def resizeEvent(self, ev):  # noqa: N802
        super().resizeEvent(ev)
        if self.legend_label is not None and self.legend_entries:
            _layout_legend(self)


def make_plot(title: str = "", x: str = "", y: str = "", *, log_x: bool = False, log_y: bool = False,
              legend: bool = False, legend_at: str = "below") -> pg.PlotWidget:
    """A plot in the window's style. ``legend``: a legend row *below* the axes (see
    :func:`set_legend`), so it never covers data. (``legend_at`` is kept for callers that named a
    corner; every legend now sits below.)"""
    from dupstudio.gui import theme

    c = theme.colors()
    w = Plot(background=c["plot_bg"])
    item = w.getPlotItem()
    if title:
        item.setTitle(title, size="10pt")
    font = QFont()
    font.setPointSize(9)
    for side in ("left", "bottom"):
        ax = item.getAxis(side)
        ax.setTickFont(font)
        ax.setPen(pg.mkPen(c["axis"]))
        ax.setTextPen(pg.mkPen(c["axis_text"]))
        ax.enableAutoSIPrefix(False)
    if x:
        item.setLabel("bottom", x)
    if y:
        item.setLabel("left", y)
    item.showGrid(x=True, y=True, alpha=0.2)
    item.setLogMode(log_x, log_y)
    w.legend_label = None
    w.legend_entries = []
    if legend:
        lab = pg.LabelItem("", size="8pt", color=c["axis_text"], justify="left")
        _shrinkable(lab)
        item.layout.addItem(lab, 4, 1)
        w.legend_label = lab
    del legend_at
    w.setMinimumHeight(160)
    return w


def _shrinkable(label: pg.LabelItem) -> None:
    """pyqtgraph's LabelItem makes its text width its minimum width; this one may be clipped
    instead (a long legend must not widen the window)."""

    def update_min() -> None:
        label.setMinimumWidth(0)
        label.setMinimumHeight(label.itemRect().height())

    label.updateMin = update_min
    update_min()


LEGEND_GLYPHS = {"line": "━━", "dash": "╍╍", "o": "●", "o_hollow": "○", "s": "■", "s_hollow": "□",
                 "d": "◆", "d_hollow": "◇", "box": "■", "hatch": "▨", "t": "▲"}


def set_legend(plot: pg.PlotWidget, entries: list, per_line: int = 0) -> None:
    """The legend row below ``plot``: ``entries`` are (glyph, colour, text), glyph one of
    :data:`LEGEND_GLYPHS` (line, dash, o, o_hollow, s, s_hollow, d, box, hatch, t) or "" for a plain
    note. Entries wrap to the plot's width (``per_line`` > 0: at most that many per line)."""
    if getattr(plot, "legend_label", None) is None:
        return
    plot.legend_entries = list(entries)
    plot.legend_per_line = per_line
    _layout_legend(plot)


def _layout_legend(plot) -> None:
    from PySide6.QtGui import QFontMetrics

    lab, entries = plot.legend_label, plot.legend_entries
    f = QFont()
    f.setPointSize(8)
    fm = QFontMetrics(f)
    room = max(200, plot.width() - 70)
    per_line = getattr(plot, "legend_per_line", 0)
    lines, line, used = [], [], 0
    for glyph, color, text in entries:
        shown = LEGEND_GLYPHS.get(glyph, glyph)
        width = fm.horizontalAdvance(f"{shown} {text}") + 24
        if line and (used + width > room or (per_line and len(line) >= per_line)):
            lines.append(line)
            line, used = [], 0
        line.append(f"<span style='color:{color}'>{shown}</span>&nbsp;{text}" if shown else text)
        used += width
    if line:
        lines.append(line)
    lab.setText("<br>".join("&nbsp;&nbsp;&nbsp;".join(parts) for parts in lines))
    lab.setMaximumHeight(16777215 if entries else 0)
    lab.setMinimumHeight(lab.itemRect().height() if entries else 0)


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


# --------------------------------------------------------------------------- tables
def rows_as_tsv(view, rows: Optional[list] = None, header: bool = True, include_hidden: bool = False) -> str:
    """The selected rows of ``view`` (any QAbstractItemView over a table model; hidden columns
    left out) as tab-separated text with a header line, as spreadsheets paste it."""
    model = view.model()
    if rows is None:
        sm = view.selectionModel()
        rows = sorted({i.row() for i in sm.selectedIndexes()}) if sm else []
    hidden = getattr(view, "isColumnHidden", lambda c: False) if not include_hidden else (lambda c: False)
    cols = [c for c in range(model.columnCount()) if not hidden(c)]

    def clean(v) -> str:
        return "" if v is None else " ".join(str(v).split())

    lines = []
    if header:
        lines.append("\t".join(clean(model.headerData(c, Qt.Horizontal, Qt.DisplayRole)) for c in cols))
    for r in rows:
        lines.append("\t".join(clean(model.index(r, c).data(Qt.DisplayRole)) for c in cols))
    return "\n".join(lines) + "\n"


def install_copy(view, on_copy=None, include_hidden: bool = False):
    """Ctrl+C (the platform's Copy key) on ``view`` copies its selected rows as TSV; returns the
    action (also in the view's context menu)."""
    from PySide6.QtGui import QAction, QGuiApplication, QKeySequence

    def copy() -> None:
        text = rows_as_tsv(view, include_hidden=include_hidden)
        if text.count("\n") > 1:
            QGuiApplication.clipboard().setText(text)
            if on_copy is not None:
                on_copy(text.count("\n") - 1)

    a = QAction("Copy rows", view)
    a.setShortcut(QKeySequence.Copy)
    a.setShortcutContext(Qt.WidgetWithChildrenShortcut)
    a.triggered.connect(lambda _c=False: copy())
    view.addAction(a)
    view.setContextMenuPolicy(Qt.ActionsContextMenu)
    return a


# --------------------------------------------------------------------------- an absolute error scale
ERROR_CMAP = "viridis"
NICE_TOPS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 25, 30, 40, 50, 60, 75, 100, 150, 200)


def error_scale_top(max_pct: float) -> float:
    """The top of the weight-error colour scale (percent): the first round value at or above the
    largest error, so the scale starts at 0 % and means the same for every block."""
    for t in NICE_TOPS:
        if max_pct <= t:
            return float(t)
    return float(math.ceil(max_pct / 100.0) * 100.0)


def error_qcolor(pct: float, top: float, alpha: int = 255):
    """The colour of ``pct`` on the 0 … ``top`` % scale (the heat map's colour map)."""
    from PySide6.QtGui import QColor

    if pct is None or not math.isfinite(pct):
        return None
    cmap = pg.colormap.get(ERROR_CMAP)
    c = cmap.mapToQColor(max(0.0, min(1.0, pct / top if top > 0 else 0.0)))
    c = QColor(c)
    c.setAlpha(alpha)
    return c
