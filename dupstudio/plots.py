"""Figures that both the command line (PNG files) and the app (widgets) draw: the sweep's
perplexity plots and the per-block sensitivity bars. pyqtgraph only; no panel, no model work
(``dupstudio.core`` computes what is drawn here)."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF
from PySide6.QtGui import QFont
from PySide6.QtWidgets import QWidget

KL_COLOR = "#1f77b4"
GAIN_COLOR = "#2ca02c"
LOSS_COLOR = "#d62728"  # a second replica that made the KL worse
TOP_TITLE = "KL from full precision, only block k quantized"
BOTTOM_TITLE = "KL removed by a second replica (red: made worse)"


def _num(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f




def _no_min_width(label: pg.LabelItem) -> None:
    """pyqtgraph's LabelItem makes its text width its minimum width on every resize; this one
    may be clipped instead (keeps its minimum height)."""

    def update_min() -> None:
        label.setMinimumWidth(0)
        label.setMinimumHeight(label.itemRect().height())

    label.updateMin = update_min
    update_min()


class SensitivityPlot(pg.GraphicsLayoutWidget):
    """Two bar charts over the block index, x linked: KL with only block k quantized (top) and
    the KL gain of a second replica of block k (bottom; negative bars in red)."""

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setBackground("w")
        self.title = self.addLabel("", row=0, col=0, size="10pt")
        _no_min_width(self.title)
        self.top = self.addPlot(row=1, col=0)
        self.bottom = self.addPlot(row=2, col=0)
        self.bottom.setXLink(self.top)
        self.ci.layout.setRowStretchFactor(1, 3)
        self.ci.layout.setRowStretchFactor(2, 2)
        font = QFont()
        font.setPointSize(9)
        for pi, ptitle in ((self.top, TOP_TITLE), (self.bottom, BOTTOM_TITLE)):
            for side in ("left", "bottom"):
                ax = pi.getAxis(side)
                ax.setTickFont(font)
                ax.setPen(pg.mkPen("#444"))
                ax.setTextPen(pg.mkPen("#222"))
                ax.enableAutoSIPrefix(False)
            pi.getAxis("left").setWidth(52)  # room for "0.005"-style labels; both charts aligned
            pi.setTitle(ptitle, size="9pt")
            _no_min_width(pi.titleLabel)  # a long title must not widen the chart past its dock
            pi.showGrid(x=False, y=True, alpha=0.25)
            pi.setMenuEnabled(False)
        self.bottom.setLabel("bottom", "decoder block")
        self.bars: dict = {}  # series -> BarGraphItem
        self.rows: list = []
        self.set_rows([])

    def set_rows(self, rows: list, title: str = "") -> None:
        self.rows = [dict(r) for r in rows]
        self.title.setText(title)
        self.title.setMaximumHeight(40 if title else 0)
        self.top.clear()
        self.bottom.clear()
        self.bars = {}
        if not self.rows:
            self._show_bottom(True)
            return
        x = np.array([int(r["block"]) for r in self.rows], dtype=float)
        kl = np.array([_num(r.get("kl_quantized")) for r in self.rows])
        ok = np.isfinite(kl)
        self.bars["kl_quantized"] = pg.BarGraphItem(x=x[ok], height=kl[ok], width=0.7, brush=KL_COLOR, pen=None)
        self.top.addItem(self.bars["kl_quantized"])
        gain = np.array([_num(r.get("kl_gain")) for r in self.rows])
        has_gain = bool(np.isfinite(gain).any())
        self._show_bottom(has_gain)
        if has_gain:
            ok = np.isfinite(gain)
            brushes = [GAIN_COLOR if g >= 0 else LOSS_COLOR for g in gain[ok]]
            self.bars["kl_gain"] = pg.BarGraphItem(x=x[ok], height=gain[ok], width=0.7, brushes=brushes, pen=None)
            self.bottom.addItem(self.bars["kl_gain"])
            self.bottom.addItem(pg.InfiniteLine(pos=0, angle=0, pen=pg.mkPen("#444", width=1)))
        lo, hi = float(x.min()), float(x.max())
        self.top.setXRange(lo - 0.6, hi + 0.6, padding=0)
        if len(x) <= 64:  # a label per block where it fits (every 5th first)
            ticks = [[(float(b), str(int(b))) for b in x if int(b) % 5 == 0],
                     [(float(b), str(int(b))) for b in x if int(b) % 5 != 0]]
            for pi in (self.top, self.bottom):
                pi.getAxis("bottom").setTicks(ticks)
        else:
            for pi in (self.top, self.bottom):
                pi.getAxis("bottom").setTicks(None)
        top = float(np.nanmax(kl)) if np.isfinite(kl).any() else 1.0
        self.top.setYRange(0.0, max(top, 1e-12) * 1.08, padding=0)

    def _show_bottom(self, shown: bool) -> None:
        """The gain chart shown or collapsed (kept in the layout: removing a linked plot from
        the scene leaves pyqtgraph callbacks pointing at deleted view boxes)."""
        self.bottom.setMinimumHeight(0)
        self.bottom.setMaximumHeight(16777215 if shown else 0)
        self.bottom.setVisible(shown)
        self.top.setLabel("bottom", None if shown else "decoder block")

    def mark(self, blocks) -> None:
        """Outline the gain bars of ``blocks`` (the ones "use the result" would change)."""
        bars = self.bars.get("kl_gain")
        if bars is None:
            return
        chosen = {int(b) for b in blocks}
        pens = [pg.mkPen("#111", width=2) if int(b) in chosen else pg.mkPen(None) for b in bars.opts["x"]]
        bars.setOpts(pens=pens)

    def export_png(self, path: str, width: int = 1000, height: int = 620) -> None:
        """Render offscreen (no show needed) into a PNG."""
        import pyqtgraph.exporters as pge

        self.resize(width, height)
        self.ci.setGeometry(QRectF(0, 0, width, height))
        exp = pge.ImageExporter(self.ci)
        exp.parameters()["width"] = width
        exp.export(str(path))
        del exp


#: a point label's width (fraction of the x data range) and height (fraction of the log-ppl range)
LABEL_WIDTH, LABEL_STEP = 0.35, 0.045


def label_offsets(dd, x: str) -> dict:
    """{row index: k}: labels of points that would overlap (close in x and in log perplexity)
    move k label-heights up (k > 0) or down (k < 0), the nearest free slot first."""
    import numpy as np

    if dd.empty:
        return {}
    xs = dd[x].to_numpy(float)
    ly = np.log10(dd["ppl"].to_numpy(float))
    xr = max(xs.max() - xs.min(), 1e-9)
    yr = max(ly.max() - ly.min(), 0.5)
    order = np.lexsort((ly, xs))
    out, placed = {}, []
    for j in order:
        tries = iter([0] + [v for n in range(1, len(xs) + 1) for v in (n, -n)])
        k = next(tries)
        while any(abs(xs[j] - xs[p]) < LABEL_WIDTH * xr and abs(ly[j] + k * yr * LABEL_STEP -
                                                             (ly[p] + kp * yr * LABEL_STEP))
                  < yr * LABEL_STEP * 0.9 for p, kp in placed):
            k = next(tries)
        placed.append((j, k))
        out[dd.index[j]] = k
    return out


_QT_PLOTS_CHILD = "DUPSTUDIO_QT_PLOTS_CHILD"


def _qt_plots_in_child(df, out: Path, budget_bpw, profile, budgets, paths) -> list:
    """Render the pyqtgraph plots in a child Python process: the sweep's own process (a test, or
    a GUI that runs the command) then never holds Qt plot objects of ours, whose teardown under the
    garbage collector of another thread can deadlock or crash PySide."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "sweep.csv"
        df.to_csv(csv, index=False)
        code = ("import json, sys, pandas as pd; from pathlib import Path; "
                "from dupstudio.plots import write_plots; "
                "write_plots(pd.read_csv(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4], "
                "budgets=json.loads(sys.argv[5]))")
        env = dict(os.environ, **{_QT_PLOTS_CHILD: "1"})
        env.setdefault("QT_QPA_PLATFORM", "offscreen")
        r = subprocess.run([sys.executable, "-c", code, str(csv), str(out), str(budget_bpw), str(profile),
                            json.dumps([float(b) for b in (budgets or [budget_bpw])])],
                           env=env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"rendering the sweep plots failed: {(r.stderr or r.stdout).strip()[-800:]}")
    return paths


def write_plots(df, out: Path, budget_bpw: float, profile: str, budgets=None) -> list:
    """PNG plots: perplexity vs bits/weight (Pareto front marked) and vs predicted latency.
    matplotlib if installed, else pyqtgraph rendered offscreen. Returns the written paths."""
    from dupstudio.core.search import pareto_front

    d = df[df["ppl"].notna() & (df["ppl"] > 0)].copy()
    d["front"] = pareto_front(d, "bits_per_weight", "ppl")
    fp = d[d["source"] == "fp"]
    fp_ppl = float(fp["ppl"].iloc[0]) if not fp.empty else None
    specs = [("ppl_vs_bpw.png", "bits_per_weight", "bits / weight (decoder-block linears)", True),
             ("ppl_vs_latency.png", "latency_ms", f"predicted decode latency, ms/token ({profile})", False)]
    paths = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for fname, x, xlabel, front in specs:
            dd = d[d[x].notna()]
            if front:  # bits plot: full precision (16 bits) as a line, not a far-away point
                dd = dd[dd["source"] != "fp"]
            fig, ax = plt.subplots(figsize=(9, 6))
            offs = label_offsets(dd, x)
            for src, mk in (("dupstudio", "o"), ("mlx-lm", "s"), ("fp", "*")):
                s = dd[dd["source"] == src]
                ax.scatter(s[x], s["ppl"], marker=mk, label=src)
                for i, r in s.iterrows():
                    ax.annotate(r["name"], (r[x], r["ppl"]), fontsize=6, xytext=(5, 8 * offs[i]),
                                textcoords="offset points",
                                arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6} if offs[i] else None)
            if front and fp_ppl:
                ax.axhline(fp_ppl, color="g", ls=":", lw=1, label=f"full precision ({fp_ppl:.1f})")
            if front:
                f = dd[dd["front"]].sort_values(x)
                ax.plot(f[x], f["ppl"], "k--", label="Pareto front")
                for b in (budgets or [budget_bpw]):
                    ax.axvline(b, color="r", lw=0.8, label=f"budget {b:g}")
            if not dd.empty:
                xv = dd[x].to_numpy(float)
                span = max(xv.max() - xv.min(), 1e-3)
                ax.set_xlim(xv.min() - 0.03 * span, xv.max() + 0.45 * span)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("perplexity")
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out / fname, dpi=120)
            plt.close(fig)
            paths.append(out / fname)
        return paths
    except ImportError:
        pass
    if os.environ.get(_QT_PLOTS_CHILD) != "1":
        return _qt_plots_in_child(df, out, budget_bpw, profile, budgets, paths=[out / s[0] for s in specs])
    import gc

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import numpy as np
    import pyqtgraph as pg

    app = pg.mkQApp()
    colors = {"dupstudio": (31, 119, 180), "mlx-lm": (255, 127, 14), "fp": (44, 160, 44)}
    for fname, x, xlabel, front in specs:
        dd = d[d[x].notna()]
        if front:
            dd = dd[dd["source"] != "fp"]
        offs = label_offsets(dd, x)
        pw = pg.PlotWidget(background="w")
        pw.resize(900, 560)
        pi = pw.getPlotItem()
        pi.addLegend(offset=(-10, 10))
        pi.setLogMode(False, True)
        pi.setLabel("bottom", xlabel)
        pi.setLabel("left", "perplexity (log)")
        lead = []
        for src, sym in (("dupstudio", "o"), ("mlx-lm", "s"), ("fp", "star")):
            s = dd[dd["source"] == src]
            if s.empty:
                continue
            pi.plot(s[x].to_numpy(float), s["ppl"].to_numpy(float), pen=None, symbol=sym, symbolSize=9,
                    symbolBrush=colors[src], name=src)
            ly = np.log10(dd["ppl"].to_numpy(float))
            step = max(ly.max() - ly.min(), 0.5) * LABEL_STEP  # one label height, in decades
            for i, r in s.iterrows():
                t = pg.TextItem(str(r["name"]), color=(60, 60, 60), anchor=(0, 1))
                y0 = float(np.log10(r["ppl"]))
                t.setPos(float(r[x]), y0 + step * offs[i])
                pi.addItem(t)
                if offs[i]:  # a label moved off its point: a leader line back to it
                    lead += [(float(r[x]), 10 ** y0), (float(r[x]), 10 ** (y0 + step * offs[i]))]
        if lead:  # one item for all leader lines
            a = np.array(lead)
            pi.plot(a[:, 0], a[:, 1], connect="pairs", pen=pg.mkPen((150, 150, 150), width=1))
        if front and fp_ppl:
            pi.addItem(pg.InfiniteLine(pos=float(np.log10(fp_ppl)), angle=0,
                                       pen=pg.mkPen((44, 160, 44), style=pg.QtCore.Qt.PenStyle.DotLine),
                                       label=f"full precision {fp_ppl:.1f}",
                                       labelOpts={"position": 0.9, "color": (44, 120, 44)}))
        if front:
            f = dd[dd["front"]].sort_values(x)
            pi.plot(f[x].to_numpy(float), f["ppl"].to_numpy(float), pen=pg.mkPen("k", width=1.5,
                    style=pg.QtCore.Qt.PenStyle.DashLine), name="Pareto front")
            for b in (budgets or [budget_bpw]):
                pi.addItem(pg.InfiniteLine(pos=b, angle=90, pen=pg.mkPen("r"), label=f"≤{b:g}",
                                           labelOpts={"position": 0.04, "color": (200, 0, 0)}))
        if not dd.empty:
            xv = dd[x].to_numpy(float)
            span = max(xv.max() - xv.min(), 1e-3)
            pi.setXRange(xv.min() - 0.03 * span, xv.max() + 0.45 * span, padding=0)
        # render the widget through QWidget.grab, which lays it out first, without showing it
        # (ImageExporter on a never-laid-out widget draws the axis labels over the tick labels)
        if not pw.grab().save(str(out / fname), "PNG"):
            raise OSError(f"could not write {out / fname}")
        paths.append(out / fname)
        # tear the widget down while the QApplication lives (else a crash at interpreter exit)
        pi.clear()
        pw.close()
        pw.deleteLater()
        del pi, pw
        app.processEvents()
        gc.collect()
        app.processEvents()
    return paths
