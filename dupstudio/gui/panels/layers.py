"""Layers tab: the per-block table (a QAbstractTableModel over the project's one Config),
in-place editing with delegates, "Apply to selected", and the totals strip."""
from __future__ import annotations

import math
from typing import Any, Optional

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QObject, Qt, Signal
from PySide6.QtGui import QAction, QBrush, QColor, QFont, QGuiApplication, QKeySequence
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QLineEdit,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QStyledItemDelegate,
    QTableView,
    QToolTip,
    QVBoxLayout,
    QWidget,
)

from dupstudio.core import config as C
from dupstudio.core.jobs import DupstudioError
from dupstudio.gui import theme
from dupstudio.gui.project import EDIT_FIELDS, FIELD_LABELS, Project, common_group_sizes
from dupstudio.gui.strategies import add_tooltips, describe
from dupstudio.gui.widgets import error_qcolor, error_scale_top, fmt_bytes, fmt_float, fmt_params, install_copy, rows_as_tsv

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
           "('…' while it is being computed). Shading: 0 % (none) up to the scale's top, as on the "
           "Distributions tab's heat map",
    "sqnr": "Signal-to-quantization-noise ratio of the primary replica, 10·log10(‖W‖² / ‖W − Ŵ‖²)",
    "replicas": "K: how many times the block runs, all replicas sharing one set of codes",
    "mode": "serial: h ← h + α (f(h) − h) per replica; parallel: h + Σ w (f(h) − h)",
    "init": "How replicas 2…K start their own scales and biases",
    "granularity": "group: own scale/bias per group; channel: per-row scale/offset on the primary",
    "bits": "Bits per weight of the block's codes (bold: set on this block; grey: the configuration's default)",
    "group_size": "Weights per group sharing one scale and bias",
    "strategy": "How each group's scale and zero point are chosen (hover over the choices for details)",
    "gains": "α (serial: one per replica, the first fixed at 1) or w (parallel) — K comma-separated "
             "numbers between 0 and 2, e.g. “1, 0.5”",
    "residual_gain": "β: the block's output is h + β (y − h); a number between 0 and 2 (1 = unchanged)",
    "loss_before": "Block-output MSE before calibration",
    "loss_after": "Block-output MSE after calibration (grey: rejected by the never-worse guard)",
}


LOCKED_REASON = ("A calibration or search is running: the table is read-only until it ends "
                 "(cancel it to edit now).")


class LayerTableModel(QAbstractTableModel):
    """Rows = decoder blocks of ``project.config`` (read live; edits go through the project's
    undoable commands)."""

    edit_failed = Signal(str)  # an edit of several rows (the apply bar, a paste) was refused
    cell_refused = Signal(int, int, str)  # row, column, why: a cell edit was refused

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

    def error_top(self) -> float:
        """The top of the absolute colour scale (percent) of the weight-error cells."""
        if self._range is None:
            vals = [100 * m["replicas"][0]["rel_fro"] for k in range(self.rowCount())
                    if (m := self.project.metrics_for(k)) is not None]
            vals = [v for v in vals if math.isfinite(v)]
            self._range = error_scale_top(max(vals)) if vals else 100.0
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
            if key in ("init", "granularity", "gains") and spec.replicas < 2:
                return f
            f |= Qt.ItemIsEditable
        return f

    def why_not_editable(self, row: int, key: str) -> str:
        """Why a cell of an editable column cannot be edited now ("" when it can)."""
        if key not in EDITABLE:
            return ""
        if self.project.locked:
            return LOCKED_REASON
        spec = self.project.config.blocks[row]
        if key in ("init", "granularity", "gains") and spec.replicas < 2:
            return "K = 1: the block has no extra replicas (set K to 2 or more first; β still applies)"
        return ""

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
                    c = error_qcolor(100 * m["replicas"][0]["rel_fro"], self.error_top(), alpha=70)
                    return QBrush(c) if c is not None else None
            if key == "replicas" and spec.replicas > 1:
                return QBrush(QColor(theme.colors()["table_tint"]))
            if key in ("init", "granularity") and spec.replicas < 2:
                return QBrush(QColor(theme.colors()["disabled_cell"]))
            return None
        if role == Qt.ForegroundRole:
            if key == "mode" and spec.replicas < 2:
                return QBrush(QColor(theme.muted()))
            if key == "loss_after" and spec.calibration:
                ok = "#3fb950" if theme.is_dark() else "#1a7f37"
                return QBrush(QColor(ok if spec.calibration.get("accepted") else theme.muted()))
            if key in ("bits", "group_size", "strategy") and getattr(spec, key) is None:
                return QBrush(QColor(theme.muted()))
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
        why = self.why_not_editable(row, key)
        if why and self.project.locked:
            return why
        if key == "strategy":
            s = self.value(row, key)
            return f"{s}: {describe('strategy', s)}" if describe("strategy", s) else TOOLTIPS.get(key)
        if key == "mode":
            return f"{spec.mode}: {describe('mode', spec.mode)}" if spec.replicas > 1 else \
                "K = 1: the mode matters once the block has replicas"
        if key in ("rel", "sqnr"):
            m = self.project.metrics_for(row)
            if m is None:
                return "being computed on the worker…"
            lines = []
            for i, r in enumerate(m["replicas"]):
                lines.append(f"replica {i + 1}: {100 * r['rel_fro']:.2f} %, {r['sqnr_db']:.2f} dB")
            lines.append("")
            for name in m["matrices"]:  # the architecture's matrices, in its order
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
        if why:
            return why
        return TOOLTIPS.get(key)

    def setData(self, index: QModelIndex, value: Any, role=Qt.EditRole) -> bool:  # noqa: N802
        """A cell edit; refused (nothing changes) with the reason at the cell when the value is
        out of range, has the wrong number of values for K, or the table is read-only."""
        if role != Qt.EditRole or not index.isValid():
            return False
        key = COLUMNS[index.column()][0]
        if key not in EDITABLE:
            return False
        why = self.why_not_editable(index.row(), key)
        if why:
            self.last_refusal = why
            self.cell_refused.emit(index.row(), index.column(), why)
            return False
        try:
            n = self.project.edit_blocks([index.row()], key, value)
        except DupstudioError as e:
            why = f"{FIELD_LABELS.get(key, key)} not changed: {e}"
            self.last_refusal = why
            self.cell_refused.emit(index.row(), index.column(), why)
            return False
        self.last_refusal = ""
        return n > 0

    def apply(self, rows: list, key: str, value: Any) -> bool:
        try:
            n = self.project.edit_blocks(rows, key, value)
        except DupstudioError as e:
            self.edit_failed.emit(f"{FIELD_LABELS.get(key, key)} not changed: {e}")
            return False
        return n > 0

    def paste_rows(self, text: str, targets: list) -> int:
        """Apply the editable cells of tab-separated rows (as :func:`rows_as_tsv` copies them, with
        or without the header line) to ``targets`` (block indices): row i of the text to target i,
        or one copied row to every target. One undo step; returns how many blocks changed, or
        refuses everything (edit_failed) when any value is invalid."""
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if not lines or not targets:
            return 0
        headers = [h for _, h in COLUMNS]
        first = lines[0].split("\t")
        if [c.strip() for c in first] == headers[:len(first)] and len(first) > 1:
            cols, lines = [c.strip() for c in first], lines[1:]
        else:
            cols = headers
        rows = [ln.split("\t") for ln in lines]
        if not rows:
            return 0
        if len(rows) == 1:
            pairs = [(t, rows[0]) for t in targets]
        else:
            start = min(targets)
            pairs = [(start + i, r) for i, r in enumerate(rows) if start + i < self.rowCount()]
        order = [k for k in EDIT_FIELDS if k in EDITABLE]
        self.paste_skipped = []
        stack = self.project.undo_stack
        stack.beginMacro(f"Paste {len(rows)} row{'s' if len(rows) != 1 else ''} onto "
                         f"{len(pairs)} block{'s' if len(pairs) != 1 else ''}")
        changed = set()
        try:
            for target, cells in pairs:
                values = {}
                for name, cell in zip(cols, cells):
                    key = next((k for k, h in COLUMNS if h == name), None)
                    cell = cell.strip()
                    if key in EDITABLE and cell and cell != "—":
                        values[key] = cell.split(",")[0].strip() if key in ("init", "granularity") else cell
                for key in order:
                    if key not in values:
                        continue
                    try:
                        if self.project.edit_blocks([target], key, values[key]):
                            changed.add(target)
                    except DupstudioError as e:
                        if key not in ("gains", "residual_gain"):
                            raise
                        # a calibrated gain may lie outside what a person types (e.g. slightly
                        # negative): the structural settings still paste; say what was left out
                        self.paste_skipped.append(f"block {target}: {FIELD_LABELS.get(key, key)} ({e})")
        except (DupstudioError, ValueError) as e:
            stack.endMacro()
            stack.undo()
            self.edit_failed.emit(f"Nothing pasted: {e}")
            return 0
        stack.endMacro()
        if not changed:
            stack.undo()  # an empty macro
        return len(changed)

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
            return [("1 (no replicas)" if k == 1 else str(k), k) for k in range(1, C.MAX_REPLICAS + 1)]
        if key == "residual_gain":
            return [(x, x) for x in ("1", "0.9", "1.1")]
        return []


class LayerDelegate(QStyledItemDelegate):
    """Combo boxes for K, mode, bits, group, strategy, init and granularity (each choice with its
    description), a line edit for α/w and β."""

    COMBO_KEYS = ("replicas", "mode", "bits", "group_size", "strategy", "init", "granularity")
    MIN_EDITOR_WIDTH = {"replicas": 130, "mode": 96, "bits": 64, "group_size": 72, "strategy": 120,
                        "init": 100, "granularity": 100, "gains": 150, "residual_gain": 80}

    def __init__(self, model: LayerTableModel, parent: Optional[QObject] = None) -> None:
        super().__init__(parent)
        self.model = model

    def createEditor(self, parent, option, index):  # noqa: N802
        key = COLUMNS[index.column()][0]
        if key in self.COMBO_KEYS:
            cb = QComboBox(parent)
            for text, value in self.model.choices(key):
                cb.addItem(text, value)
            add_tooltips(cb, key)
            # commit as soon as a value is picked
            cb.activated.connect(lambda _i, cb=cb: (self.commitData.emit(cb), self.closeEditor.emit(cb)))
            return cb
        ed = super().createEditor(parent, option, index)
        if isinstance(ed, QLineEdit):
            ed.setToolTip(TOOLTIPS.get(key, ""))
            if key == "gains":
                k = self.model.project.config.blocks[index.row()].replicas
                ed.setPlaceholderText(f"{k} numbers, e.g. " + ", ".join(["1"] + ["0.5"] * (k - 1)))
        return ed

    def updateEditorGeometry(self, editor, option, index):  # noqa: N802
        """Editors at least wide enough to read (a narrow column must not cramp its editor)."""
        super().updateEditorGeometry(editor, option, index)
        key = COLUMNS[index.column()][0]
        r = editor.geometry()
        want = self.MIN_EDITOR_WIDTH.get(key, 0)
        if r.width() < want:
            r.setWidth(want)
            editor.setGeometry(r)

    def setEditorData(self, editor, index):  # noqa: N802
        value = index.data(Qt.EditRole)
        if isinstance(editor, QComboBox):
            i = editor.findData(value)
            editor.setCurrentIndex(max(i, 0))
        else:
            super().setEditorData(editor, index)

    def setModelData(self, editor, model, index):  # noqa: N802
        if isinstance(editor, QComboBox):
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
        add_tooltips(self.value, key)
        self.value.setToolTip(TOOLTIPS.get(key, ""))
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
    status = Signal(str)  # a short note for the window's status line

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
        hh.setStretchLastSection(True)  # spare width to the last column; a narrow window scrolls instead
        widths = {"block": 48, "params": 86, "bpw": 90, "rel": 94, "sqnr": 76, "replicas": 40, "mode": 70,
                  "bits": 44, "group_size": 52, "strategy": 86, "init": 92, "granularity": 86, "gains": 110,
                  "residual_gain": 48, "loss_before": 90, "loss_after": 120}
        for key, w in widths.items():
            self.view.setColumnWidth(COL[key], w)
        self.apply_bar = ApplyBar(self.model, self.view)
        lay.addWidget(self.apply_bar)
        self.lock_note = QLabel("🔒 " + LOCKED_REASON)
        self.lock_note.setObjectName("layersLocked")
        self.lock_note.setWordWrap(True)
        self.lock_note.setStyleSheet(theme.banner_css("warning", "4px 8px"))
        self.lock_note.hide()
        lay.addWidget(self.lock_note)
        lay.addWidget(self.view, 1)
        self.hint = QLabel("Double-click a cell to edit (K, mode, bits, group, strategy, replica init, "
                           "granularity, α/w, β); select rows and use the bar above to set many at once. "
                           "Ctrl+C copies the selected rows (tab-separated), Ctrl+V pastes their settings "
                           "onto the selected blocks; Ctrl+Z / Ctrl+Shift+Z undo and redo.")
        self.hint.setWordWrap(True)
        self.hint.setStyleSheet(theme.muted_css())
        lay.addWidget(self.hint)
        self.copy_action = install_copy(self.view, lambda n: self.status.emit(
            f"Copied {n} row{'s' if n != 1 else ''} (tab-separated)"))
        self.paste_action = QAction("Paste settings onto the selected rows", self.view)
        self.paste_action.setShortcut(QKeySequence.Paste)
        self.paste_action.setShortcutContext(Qt.WidgetWithChildrenShortcut)
        self.paste_action.triggered.connect(lambda _c=False: self.paste())
        self.view.addAction(self.paste_action)
        self.view.selectionModel().selectionChanged.connect(lambda *_: self.apply_bar.update_count())
        self.view.doubleClicked.connect(self._double_clicked)
        self.model.modelReset.connect(self._after_reset)
        self.model.cell_refused.connect(self.show_refusal)
        project.busy_changed.connect(self._busy_changed)

    def _after_reset(self) -> None:
        self.apply_bar.update_count()

    def _busy_changed(self, locked: bool) -> None:
        self.apply_bar.update_count()
        self.lock_note.setVisible(locked)
        self.paste_action.setEnabled(not locked)

    def _double_clicked(self, index) -> None:
        why = self.model.why_not_editable(index.row(), COLUMNS[index.column()][0]) if index.isValid() else ""
        if why:
            self.show_refusal(index.row(), index.column(), why)

    def show_refusal(self, row: int, col: int, why: str) -> None:
        """The reason an edit was refused, at the cell (a tooltip) and in the status line."""
        rect = self.view.visualRect(self.model.index(row, col))
        if self.view.isVisible():
            QToolTip.showText(self.view.viewport().mapToGlobal(rect.bottomLeft()), why, self.view.viewport(), rect,
                              6000)
        self.status.emit(why)

    def copy_rows(self) -> str:
        text = rows_as_tsv(self.view)
        QGuiApplication.clipboard().setText(text)
        return text

    def paste(self, text: Optional[str] = None) -> int:
        """Ctrl+V: the settings of copied rows onto the selected blocks (one undo step)."""
        if self.project.locked:
            self.status.emit(LOCKED_REASON)
            return 0
        rows = self.apply_bar.selected_rows() or [self.current_block()]
        n = self.model.paste_rows(QGuiApplication.clipboard().text() if text is None else text, rows)
        if n:
            skipped = getattr(self.model, "paste_skipped", [])
            self.status.emit(f"Pasted settings onto {n} block{'s' if n != 1 else ''}"
                             + (f"; not pasted: {'; '.join(skipped)}" if skipped else ""))
        return n

    def current_block(self) -> int:
        i = self.view.currentIndex()
        return i.row() if i.isValid() else 0


class TotalsBar(QWidget):
    """Bits/weight, sizes, passes and the predicted decode latency (roofline, three cache
    assumptions) of the whole configuration; recomputed on every edit. One line where it fits,
    wrapped between its parts where the window is narrow (it never widens the window)."""

    TIPS = {"bpw": "Effective bits per weight of the decoder-block linears: codes plus every 16-bit scale, "
                   "bias and replica parameter",
            "size": "Deployed sizes: decoder-block linears with every replica parameter, and the whole model "
                    "(embedding as configured)",
            "passes": "Decoder-layer passes per token, and FLOPs relative to K = 1",
            "latency": "Predicted decode latency per token on the profile (roofline with the per-layer floor): "
                       "shared codes re-read from cache / measured ratio / DRAM"}

    def __init__(self, project: Project, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.project = project
        self.setObjectName("totalsBar")
        c = theme.colors()
        self.setStyleSheet(f"QWidget#totalsBar {{ background: {c['panel']}; border-top: 1px solid "
                           f"{c['panel_border']}; }} QLabel {{ padding: 0 6px; }}")
        self.setAttribute(Qt.WA_StyledBackground, True)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(6, 3, 6, 3)
        self.strip = QLabel("—")
        self.strip.setObjectName("totalsStrip")
        self.strip.setWordWrap(True)
        self.strip.setTextFormat(Qt.RichText)
        self.strip.setToolTip("\n".join(self.TIPS.values()))
        lay.addWidget(self.strip, 1)
        self.parts: dict = {}
        self._profile = None
        self.values: dict = {}
        project.config_replaced.connect(self.refresh)
        project.blocks_changed.connect(lambda _rows: self.refresh())

    def _show(self) -> None:
        gap = "&nbsp;&nbsp;&nbsp;&nbsp; "  # lines break between the short parts, not inside them
        self.strip.setText(gap.join(v if k == "latency" else v.replace(" ", "&nbsp;")
                                    for k, v in self.parts.items()) or "—")

    def text(self) -> str:
        return " · ".join(self.parts.values())

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
        self.parts = {}
        if p.config is None or p.shape is None:
            self._show()
            return
        from dupstudio.core.replicate import accounting

        a = accounting(p.config, p.shape)
        self.values = {"bits_per_weight": a["bits_per_weight"], "total_bytes": a["total_bytes"],
                       "block_linear_bytes": a["block_linear_bytes"], "passes": a["passes"],
                       "flops_ratio": a["flops_ratio"]}
        self.parts["bpw"] = f"<b>{a['bits_per_weight']:.3f}</b> bits/weight"
        self.parts["size"] = f"linears {fmt_bytes(a['block_linear_bytes'])} · model {fmt_bytes(a['total_bytes'])}"
        self.parts["passes"] = f"{a['passes']} passes ({len(p.config.blocks)} blocks) · FLOPs ×{a['flops_ratio']:.2f}"
        prof = self.profile()
        if prof is None:
            self.parts["latency"] = "roofline: no hardware profile"
            self._show()
            return
        from dupstudio.gui.project import predict

        try:
            r = predict(p.config, p.shape, prof)
        except DupstudioError as e:
            self.parts["latency"] = f"roofline: {e}"
            self._show()
            return
        d = {a_: r.decode[a_].predicted_ms for a_ in ("cache", "measured", "dram")}
        self.values["predicted_ms"] = d
        self.parts["latency"] = (
            f"{prof.label.replace('Apple ', '').split(' (')[0]} decode (predicted): <b>{d['cache']:.2f}</b> / "
            f"{d['measured']:.2f} / {d['dram']:.2f} ms per token "
            f"<span style='color:{theme.muted()}'>(cache / measured / DRAM)</span>")
        self._show()
