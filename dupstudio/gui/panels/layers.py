"""Layers tab: the per-block table (a QAbstractTableModel over the project's one Config),
in-place editing with delegates, "Apply to selected", and the totals strip."""
from __future__ import annotations

import math
from typing import Any, Optional

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QObject, Qt, Signal
from PySide6.QtGui import QBrush, QColor, QFont
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSpinBox,
    QStyledItemDelegate,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from dupstudio.core import config as C
from dupstudio.core.jobs import DupstudioError
from dupstudio.core.model_io import MATRIX_NAMES
from dupstudio.gui.project import FIELD_LABELS, Project, common_group_sizes
from dupstudio.gui.widgets import fmt_bytes, fmt_float, fmt_params

COLUMNS = [
    ("block", "Block"),
    ("params", "Parameters"),
    ("bpw", "Bits / weight"),
    ("rel", "Weight error"),
    ("sqnr", "SQNR (dB)"),
    ("replicas", "K"),
    ("mode", "Mode"),
    ("bits", "Bits"),
    ("group_size", "Group"),
    ("strategy", "Strategy"),
    ("init", "Replica init"),
    ("granularity", "Granularity"),
    ("gains", "α / w"),
    ("residual_gain", "β"),
    ("loss_before", "Loss before"),
    ("loss_after", "Loss after"),
]
COL = {key: i for i, (key, _) in enumerate(COLUMNS)}
EDITABLE = {"replicas", "mode", "bits", "group_size", "strategy", "init", "granularity", "gains",
            "residual_gain"}
TOOLTIPS = {
    "bpw": "Effective bits per weight of the block's linears: codes plus every stored 16-bit value "
           "(scales, biases, replica parameters, gains)",
    "rel": "Relative Frobenius error ‖W − Ŵ‖ / ‖W‖ of the primary replica over the block's 7 matrices "
           "(computed on the worker; '…' while it is being computed)",
    "sqnr": "Signal-to-quantization-noise ratio of the primary replica, 10·log10(‖W‖² / ‖W − Ŵ‖²)",
    "replicas": "K: how many times the block runs, all replicas sharing one set of codes",
    "mode": "serial: h ← h + α (f(h) − h) per replica; parallel: h + Σ w (f(h) − h)",
    "init": "How replicas 2…K start their own scales/biases",
    "granularity": "group: own scale/bias per group; channel: per-row scale/offset on the primary",
    "gains": "α (serial; the first is fixed at 1) or w (parallel) per replica — comma-separated",
    "residual_gain": "β: block output h + β (y − h)",
    "loss_before": "Block-output MSE before calibration",
    "loss_after": "Block-output MSE after calibration (grey: rejected by the never-worse guard)",
}


def _error_color(rel: float, lo: float, hi: float) -> QColor:
    """White (the smallest block error) to orange (the largest), across the blocks computed."""
    if rel is None or not math.isfinite(rel):
        return QColor("white")
    t = 0.0 if hi <= lo else (rel - lo) / (hi - lo)
    t = max(0.0, min(1.0, t))
    return QColor.fromRgbF(1.0, 1.0 - 0.45 * t, 1.0 - 0.7 * t)


class LayerTableModel(QAbstractTableModel):
    """Rows = decoder blocks of ``project.config`` (read live; edits go through the project's
    undoable commands)."""

    edit_failed = Signal(str)

    def __init__(self, project: Project, parent: Optional[QObject] = None) -> None:
        super().__init__(parent)
        self.project = project
        self._acct: Optional[dict] = None
        self._range: Optional[tuple] = None
        project.config_replaced.connect(self._reset)
        project.blocks_changed.connect(self._rows_changed)
        project.metrics_changed.connect(self._metrics_changed)
        project.busy_changed.connect(lambda _b: self._rows_changed(list(range(self.rowCount()))))

    # ------------------------------------------------------------------ change notifications
    def _reset(self) -> None:
        self.beginResetModel()
        self._acct = None
        self.endResetModel()

    def _rows_changed(self, rows: list) -> None:
        self._acct = None
        self._range = None
        if not rows or self.rowCount() == 0:
            return
        self.dataChanged.emit(self.index(min(rows), 0), self.index(max(rows), len(COLUMNS) - 1))

    def error_range(self) -> tuple:
        if self._range is None:
            vals = [m["replicas"][0]["rel_fro"] for k in range(self.rowCount())
                    if (m := self.project.metrics_for(k)) is not None]
            vals = [v for v in vals if math.isfinite(v)]
            self._range = (min(vals), max(vals)) if vals else (0.0, 1.0)
        return self._range

    def _metrics_changed(self, rows: list) -> None:
        self._range = None
        if rows and self.rowCount():
            self.dataChanged.emit(self.index(min(rows), COL["rel"]), self.index(max(rows), COL["sqnr"]))

    def accounting(self) -> Optional[dict]:
        p = self.project
        if p.config is None or p.shape is None:
            return None
        if self._acct is None:
            from dupstudio.core.replicate import accounting

            self._acct = accounting(p.config, p.shape)
        return self._acct

    # ------------------------------------------------------------------ Qt model API
    def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: N802
        if parent.isValid() or self.project.config is None:
            return 0
        return len(self.project.config.blocks)

    def columnCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section: int, orientation, role=Qt.DisplayRole):  # noqa: N802
        if orientation == Qt.Horizontal:
            if role == Qt.DisplayRole:
                return COLUMNS[section][1]
            if role == Qt.ToolTipRole:
                return TOOLTIPS.get(COLUMNS[section][0])
        return None

    def flags(self, index: QModelIndex):
        f = Qt.ItemIsEnabled | Qt.ItemIsSelectable
        if not index.isValid():
            return f
        key = COLUMNS[index.column()][0]
        if key in EDITABLE and not self.project.locked:
            spec = self.project.config.blocks[index.row()]
            if key in ("init", "granularity") and spec.replicas < 2:
                return f
            f |= Qt.ItemIsEditable
        return f

    def value(self, row: int, key: str) -> Any:
        """The raw value behind a cell (edit role)."""
        cfg = self.project.config
        spec = cfg.blocks[row]
        bits, g, strategy, _ = cfg.block_quant(row)
        if key == "replicas":
            return spec.replicas
        if key == "mode":
            return spec.mode
        if key == "bits":
            return bits
        if key == "group_size":
            return g
        if key == "strategy":
            return strategy
        if key == "init":
            return spec.replica[1].init if spec.replicas > 1 else None
        if key == "granularity":
            return spec.replica[1].granularity if spec.replicas > 1 else None
        if key == "gains":
            return ", ".join(f"{float(x):.4g}" for x in spec.gains)
        if key == "residual_gain":
            return f"{float(spec.residual_gain):.4g}"
        return None

    def data(self, index: QModelIndex, role=Qt.DisplayRole):
        if not index.isValid() or self.project.config is None:
            return None
        row, key = index.row(), COLUMNS[index.column()][0]
        cfg = self.project.config
        if row >= len(cfg.blocks):
            return None
        spec = cfg.blocks[row]
        if role == Qt.EditRole:
            return self.value(row, key)
        if role == Qt.DisplayRole:
            return self._display(row, key, spec)
        if role == Qt.TextAlignmentRole:
            if key in ("mode", "strategy", "init", "granularity"):
                return int(Qt.AlignLeft | Qt.AlignVCenter)
            return int(Qt.AlignRight | Qt.AlignVCenter)
        if role == Qt.BackgroundRole:
            if key in ("rel", "sqnr"):
                m = self.project.metrics_for(row)
                if m:
                    return QBrush(_error_color(m["replicas"][0]["rel_fro"], *self.error_range()))
            if key == "replicas" and spec.replicas > 1:
                return QBrush(QColor("#e3efff"))
            if key in ("init", "granularity") and spec.replicas < 2:
                return QBrush(QColor("#f4f4f4"))
            return None
        if role == Qt.ForegroundRole:
            if key == "mode" and spec.replicas < 2:
                return QBrush(QColor("#999"))
            if key == "loss_after" and spec.calibration:
                return QBrush(QColor("#1a7f37" if spec.calibration.get("accepted") else "#999"))
            if key in ("bits", "group_size", "strategy"):
                explicit = getattr(spec, key) is not None
                return QBrush(QColor("#000" if explicit else "#555"))
            return None
        if role == Qt.FontRole:
            if key in ("bits", "group_size", "strategy") and getattr(spec, key) is not None:
                f = QFont()
                f.setBold(True)
                return f
            return None
        if role == Qt.ToolTipRole:
            return self._tooltip(row, key, spec)
        return None

    def _display(self, row: int, key: str, spec) -> Any:
        cfg = self.project.config
        if key == "block":
            return str(row)
        if key == "params":
            acct = self.accounting()
            return fmt_params(acct["blocks"][row]["params"]) if acct else ""
        if key == "bpw":
            acct = self.accounting()
            return f"{acct['blocks'][row]['bits_per_weight']:.3f}" if acct else ""
        if key in ("rel", "sqnr"):
            m = self.project.metrics_for(row)
            if m is None:
                return "…"
            r = m["replicas"][0]
            return f"{100 * r['rel_fro']:.2f} %" if key == "rel" else f"{r['sqnr_db']:.2f}"
        if key == "replicas":
            return str(spec.replicas)
        if key == "mode":
            return spec.mode
        if key in ("bits", "group_size", "strategy"):
            return str(self.value(row, key))
        if key in ("init", "granularity"):
            if spec.replicas < 2:
                return "—"
            vals = []
            for r in spec.replica[1:]:
                v = getattr(r, key)
                if v not in vals:
                    vals.append(v)
            return ", ".join(vals)
        if key == "gains":
            if spec.replicas < 2:
                return "—"
            return ", ".join(f"{float(x):.3g}" for x in spec.gains)
        if key == "residual_gain":
            return f"{float(spec.residual_gain):.3g}"
        if key in ("loss_before", "loss_after"):
            c = spec.calibration
            if not c:
                return ""
            v = c.get(key)
            txt = fmt_float(v, 4)
            if key == "loss_after" and not c.get("accepted"):
                txt += " (rejected)"
            return txt
        del cfg
        return None

    def _tooltip(self, row: int, key: str, spec) -> Optional[str]:
        if key in ("rel", "sqnr"):
            m = self.project.metrics_for(row)
            if m is None:
                return "being computed on the worker…"
            lines = []
            for i, r in enumerate(m["replicas"]):
                lines.append(f"replica {i + 1}: {100 * r['rel_fro']:.2f} %, {r['sqnr_db']:.2f} dB")
            lines.append("")
            for name in MATRIX_NAMES:
                r = m["matrices"][name][0]
                lines.append(f"{name}: {100 * r['rel_fro']:.2f} %, {r['sqnr_db']:.2f} dB")
            return "\n".join(lines)
        if key in ("loss_before", "loss_after") and spec.calibration:
            c = spec.calibration
            return (f"method {c.get('method')}, {c.get('steps')} steps, {c.get('seconds', 0):.1f} s, "
                    f"{'accepted' if c.get('accepted') else 'rejected (kept the previous parameters)'}")
        if key in ("init", "granularity") and spec.replicas > 1:
            return "\n".join(f"replica {i + 1}: init {r.init}{' ' + str(r.init_args) if r.init_args else ''}, "
                             f"{r.granularity}" for i, r in enumerate(spec.replica))
        return TOOLTIPS.get(key)

    def setData(self, index: QModelIndex, value: Any, role=Qt.EditRole) -> bool:  # noqa: N802
        if role != Qt.EditRole or not index.isValid():
            return False
        key = COLUMNS[index.column()][0]
        if key not in EDITABLE:
            return False
        return self.apply([index.row()], key, value)

    def apply(self, rows: list, key: str, value: Any) -> bool:
        try:
            n = self.project.edit_blocks(rows, key, value)
        except DupstudioError as e:
            self.edit_failed.emit(str(e))
            return False
        return n > 0

    # ------------------------------------------------------------------ choices for editors
    def choices(self, key: str) -> list:
        """(text, value) pairs for a combo editor."""
        p = self.project
        if key == "mode":
            return [(m, m) for m in C.MODES]
        if key == "bits":
            return [(str(b), b) for b in C.SUPPORTED_BITS]
        if key == "group_size":
            return [(str(g), g) for g in (common_group_sizes(p.shape) if p.shape else (32, 64, 128))]
        if key == "strategy":
            from dupstudio.core import quant as Q

            return [(s, s) for s in Q.STRATEGIES]
        if key == "init":
            return [(i, i) for i in C.INITS]
        if key == "granularity":
            return [(g, g) for g in C.GRANULARITIES]
        if key == "replicas":
            return [(str(k), k) for k in range(1, C.MAX_REPLICAS + 1)]
        if key == "residual_gain":
            return [(x, x) for x in ("1", "0.9", "1.1")]
        return []


class LayerDelegate(QStyledItemDelegate):
    """Spin box for K, combo boxes for mode/bits/group/strategy/init/granularity, a line edit for
    gains and β."""

    COMBO_KEYS = ("mode", "bits", "group_size", "strategy", "init", "granularity")

    def __init__(self, model: LayerTableModel, parent: Optional[QObject] = None) -> None:
        super().__init__(parent)
        self.model = model

    def createEditor(self, parent, option, index):  # noqa: N802
        key = COLUMNS[index.column()][0]
        if key == "replicas":
            sb = QSpinBox(parent)
            sb.setRange(1, C.MAX_REPLICAS)
            sb.setFrame(False)
            return sb
        if key in self.COMBO_KEYS:
            cb = QComboBox(parent)
            for text, value in self.model.choices(key):
                cb.addItem(text, value)
            # commit as soon as a value is picked
            cb.activated.connect(lambda _i, cb=cb: (self.commitData.emit(cb), self.closeEditor.emit(cb)))
            return cb
        return super().createEditor(parent, option, index)

    def setEditorData(self, editor, index):  # noqa: N802
        key = COLUMNS[index.column()][0]
        value = index.data(Qt.EditRole)
        if isinstance(editor, QSpinBox):
            editor.setValue(int(value))
        elif isinstance(editor, QComboBox):
            i = editor.findData(value)
            editor.setCurrentIndex(max(i, 0))
        else:
            super().setEditorData(editor, index)
        del key

    def setModelData(self, editor, model, index):  # noqa: N802
        if isinstance(editor, QSpinBox):
            editor.interpretText()
            model.setData(index, editor.value(), Qt.EditRole)
        elif isinstance(editor, QComboBox):
            model.setData(index, editor.currentData(), Qt.EditRole)
        else:
            super().setModelData(editor, model, index)


APPLY_FIELDS = ["replicas", "mode", "bits", "group_size", "strategy", "init", "granularity", "residual_gain"]


class ApplyBar(QWidget):
    """Apply one setting to every selected row (one undo step)."""

    def __init__(self, model: LayerTableModel, view: QTableView, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.model, self.view = model, view
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.count = QLabel("No rows selected")
        self.count.setMinimumWidth(120)
        lay.addWidget(self.count)
        lay.addWidget(QLabel("Set"))
        self.field = QComboBox()
        for key in APPLY_FIELDS:
            self.field.addItem(FIELD_LABELS.get(key, key), key)
        self.field.currentIndexChanged.connect(self._fill_values)
        lay.addWidget(self.field)
        lay.addWidget(QLabel("to"))
        self.value = QComboBox()
        self.value.setMinimumWidth(110)
        lay.addWidget(self.value)
        self.apply_button = QPushButton("Apply to selected")
        self.apply_button.clicked.connect(self.apply)
        lay.addWidget(self.apply_button)
        lay.addSpacing(12)
        b = QPushButton("Select all")
        b.clicked.connect(view.selectAll)
        lay.addWidget(b)
        b = QPushButton("Odd blocks")
        b.setToolTip("Select blocks 1, 3, 5, …")
        b.clicked.connect(lambda: self.select_rows([r for r in range(model.rowCount()) if r % 2]))
        lay.addWidget(b)
        lay.addStretch(1)
        self._fill_values()
        self.update_count()

    def _fill_values(self) -> None:
        key = self.field.currentData()
        self.value.clear()
        self.value.setEditable(key == "residual_gain")
        for text, value in self.model.choices(key):
            self.value.addItem(text, value)
        if key == "replicas":
            self.value.setCurrentIndex(1)

    def selected_rows(self) -> list:
        sm = self.view.selectionModel()
        return sorted({i.row() for i in sm.selectedIndexes()}) if sm else []

    def select_rows(self, rows: list) -> None:
        from PySide6.QtCore import QItemSelection, QItemSelectionModel

        sel = QItemSelection()
        for r in rows:
            sel.select(self.model.index(r, 0), self.model.index(r, len(COLUMNS) - 1))
        self.view.selectionModel().select(sel, QItemSelectionModel.ClearAndSelect)

    def update_count(self) -> None:
        n = len(self.selected_rows())
        self.count.setText(f"{n} row{'s' if n != 1 else ''} selected" if n else "No rows selected")
        self.apply_button.setEnabled(n > 0 and not self.model.project.locked)

    def apply(self) -> bool:
        rows = self.selected_rows()
        if not rows:
            return False
        key = self.field.currentData()
        value = self.value.currentText() if key == "residual_gain" else self.value.currentData()
        return self.model.apply(rows, key, value)


class LayersPanel(QWidget):
    def __init__(self, project: Project, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.project = project
        lay = QVBoxLayout(self)
        self.model = LayerTableModel(project, self)
        self.view = QTableView()
        self.view.setObjectName("layerTable")
        self.view.setModel(self.model)
        self.view.setItemDelegate(LayerDelegate(self.model, self.view))
        self.view.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.view.setSelectionMode(QAbstractItemView.ExtendedSelection)
        self.view.setEditTriggers(QAbstractItemView.DoubleClicked | QAbstractItemView.EditKeyPressed
                                  | QAbstractItemView.SelectedClicked)
        self.view.setAlternatingRowColors(False)
        self.view.verticalHeader().setVisible(False)
        self.view.verticalHeader().setDefaultSectionSize(24)
        hh = self.view.horizontalHeader()
        hh.setSectionResizeMode(QHeaderView.Interactive)
        hh.setSectionResizeMode(COL["gains"], QHeaderView.Stretch)
        widths = {"block": 48, "params": 86, "bpw": 90, "rel": 94, "sqnr": 76, "replicas": 36, "mode": 70,
                  "bits": 44, "group_size": 52, "strategy": 86, "init": 92, "granularity": 86, "gains": 110,
                  "residual_gain": 48, "loss_before": 90, "loss_after": 120}
        for key, w in widths.items():
            self.view.setColumnWidth(COL[key], w)
        self.apply_bar = ApplyBar(self.model, self.view)
        lay.addWidget(self.apply_bar)
        lay.addWidget(self.view, 1)
        self.hint = QLabel("Double-click a cell to edit (K, mode, bits, group, strategy, replica init, "
                           "granularity, α/w, β); select rows and use the bar above to set many at once. "
                           "Ctrl+Z / Ctrl+Shift+Z undo and redo.")
        self.hint.setWordWrap(True)
        self.hint.setStyleSheet("QLabel { color: #666; }")
        lay.addWidget(self.hint)
        self.view.selectionModel().selectionChanged.connect(lambda *_: self.apply_bar.update_count())
        self.model.modelReset.connect(self._after_reset)
        project.busy_changed.connect(lambda _b: self.apply_bar.update_count())

    def _after_reset(self) -> None:
        self.apply_bar.update_count()

    def current_block(self) -> int:
        i = self.view.currentIndex()
        return i.row() if i.isValid() else 0


class TotalsBar(QWidget):
    """Bits/weight, sizes, passes and the predicted decode latency (roofline, three cache
    assumptions) of the whole configuration; recomputed on every edit."""

    def __init__(self, project: Project, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.project = project
        self.setObjectName("totalsBar")
        self.setStyleSheet("QWidget#totalsBar { background: #f3f5f8; border-top: 1px solid #d0d5dd; }"
                           " QLabel { padding: 0 6px; }")
        self.setAttribute(Qt.WA_StyledBackground, True)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(6, 3, 6, 3)
        self.labels = {}
        for key, tip in (("bpw", "Effective bits per weight of the decoder-block linears (decisions 2, 3)"),
                         ("size", "Deployed sizes: decoder-block linears with every replica parameter, and "
                                  "the whole model (embedding as configured)"),
                         ("passes", "Decoder-layer passes per token, and FLOPs relative to K = 1"),
                         ("latency", "Predicted decode latency per token on the profile (roofline with the "
                                     "per-layer floor): shared codes re-read from cache / measured ratio / DRAM")):
            lab = QLabel("—")
            lab.setToolTip(tip)
            lab.setObjectName(f"total_{key}")
            self.labels[key] = lab
            lay.addWidget(lab)
        lay.addStretch(1)
        self._profile = None
        self.values: dict = {}
        project.config_replaced.connect(self.refresh)
        project.blocks_changed.connect(lambda _rows: self.refresh())

    def profile(self):
        if self._profile is None:
            from dupstudio.core import roofline as RF

            try:
                self._profile = RF.get_profile(None)
            except Exception:  # noqa: BLE001 - the bar must not break the window
                self._profile = False
        return self._profile or None

    def refresh(self) -> None:
        p = self.project
        if p.config is None or p.shape is None:
            for lab in self.labels.values():
                lab.setText("—")
            return
        from dupstudio.core.replicate import accounting

        a = accounting(p.config, p.shape)
        self.values = {"bits_per_weight": a["bits_per_weight"], "total_bytes": a["total_bytes"],
                       "block_linear_bytes": a["block_linear_bytes"], "passes": a["passes"],
                       "flops_ratio": a["flops_ratio"]}
        self.labels["bpw"].setText(f"<b>{a['bits_per_weight']:.3f}</b> bits/weight")
        self.labels["size"].setText(f"linears {fmt_bytes(a['block_linear_bytes'])} · "
                                    f"model {fmt_bytes(a['total_bytes'])}")
        self.labels["passes"].setText(f"{a['passes']} passes ({len(p.config.blocks)} blocks) · "
                                      f"FLOPs ×{a['flops_ratio']:.2f}")
        prof = self.profile()
        if prof is None:
            self.labels["latency"].setText("roofline: no hardware profile")
            return
        from dupstudio.gui.project import predict

        try:
            r = predict(p.config, p.shape, prof)
        except DupstudioError as e:
            self.labels["latency"].setText(f"roofline: {e}")
            return
        d = {a_: r.decode[a_].predicted_ms for a_ in ("cache", "measured", "dram")}
        self.values["predicted_ms"] = d
        self.labels["latency"].setText(
            f"{prof.label.replace('Apple ', '')} decode (predicted): <b>{d['cache']:.2f}</b> / "
            f"{d['measured']:.2f} / {d['dram']:.2f} ms per token "
            f"<span style='color:#666'>(cache / measured / DRAM)</span>")
