"""Model tab: open a model (folder, .gguf, hub id, the default), and its summary."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSizePolicy,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from dupstudio.gui import theme
from dupstudio.gui.widgets import fmt_bytes, fmt_params


class ModelPanel(QWidget):
    """The loaded model's summary: facts, sizes at 16/4/3/2 bits, one block's matrices."""

    open_folder = Signal()
    open_gguf = Signal()
    open_default = Signal()
    open_source = Signal(str)  # hub id or path typed in
    open_recent = Signal(str)

    FIELDS = [
        ("model", "Model"),
        ("architecture", "Architecture"),
        ("blocks", "Decoder blocks"),
        ("hidden", "Hidden size"),
        ("intermediate", "MLP width"),
        ("heads", "Attention heads"),
        ("vocab", "Vocabulary"),
        ("embeddings", "Embeddings"),
        ("parameters", "Parameters"),
        ("linear", "Decoder linears"),
        ("path", "Folder"),
    ]
    SIZE_BITS = ("16", "4", "3", "2")

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        outer = QVBoxLayout(self)

        self.title = QLabel("No model loaded")
        f = self.title.font()
        f.setPointSizeF(f.pointSizeF() * 1.5)
        f.setBold(True)
        self.title.setFont(f)
        self.title.setObjectName("modelTitle")
        outer.addWidget(self.title)

        bar = QHBoxLayout()
        self.open_buttons = []
        b = QPushButton("Open model folder…")
        b.clicked.connect(self.open_folder)
        bar.addWidget(b)
        self.open_buttons.append(b)
        b = QPushButton("Open GGUF file…")
        b.clicked.connect(self.open_gguf)
        bar.addWidget(b)
        self.open_buttons.append(b)
        b = QPushButton("Default model (SmolLM2-135M)")
        b.clicked.connect(self.open_default)
        bar.addWidget(b)
        self.open_buttons.append(b)
        bar.addSpacing(16)
        self.source_edit = QLineEdit()
        self.source_edit.setPlaceholderText("Hugging Face id (org/name) or a path")
        self.source_edit.returnPressed.connect(self._open_typed)
        bar.addWidget(self.source_edit, 1)
        b = QPushButton("Open")
        b.clicked.connect(self._open_typed)
        bar.addWidget(b)
        self.open_buttons.append(b)
        outer.addLayout(bar)
        hint = QLabel("Tip: drop a model folder, a .gguf file or a configuration (.json) onto the window.")
        hint.setStyleSheet(theme.muted_css())
        outer.addWidget(hint)

        self.loading = QLabel("")
        self.loading.setObjectName("modelLoading")
        self.loading.setStyleSheet("QLabel { color: palette(dark); font-style: italic; }")
        self.loading.hide()
        outer.addWidget(self.loading)

        grid = QGridLayout()
        outer.addLayout(grid, 1)

        facts = QGroupBox("Model")
        form = QFormLayout(facts)
        form.setLabelAlignment(Qt.AlignRight)
        form.setFieldGrowthPolicy(QFormLayout.ExpandingFieldsGrow)
        self.fields: dict[str, QLabel] = {}
        for key, label in self.FIELDS:
            value = QLabel("—")
            value.setObjectName(f"field_{key}")
            value.setTextInteractionFlags(Qt.TextSelectableByMouse)
            value.setWordWrap(False)
            self.fields[key] = value
            form.addRow(label + ":", value)
        grid.addWidget(facts, 0, 0)
        recent_box = QGroupBox("Recent models (double-click to open)")
        rb = QVBoxLayout(recent_box)
        self.recent = QListWidget()
        self.recent.setObjectName("recentModels")
        self.recent.itemActivated.connect(lambda it: self.open_recent.emit(it.data(Qt.UserRole)))
        rb.addWidget(self.recent)
        grid.addWidget(recent_box, 1, 0)

        sizes_box = QGroupBox("Size of the weights")
        sb = QVBoxLayout(sizes_box)
        self.sizes = self._table(["Decoder linears at", "Model size", "Bits / weight", "vs 16-bit"])
        self.sizes.setObjectName("sizesTable")
        sb.addWidget(self.sizes)
        self.size_note = QLabel("")
        self.size_note.setWordWrap(True)
        self.size_note.setStyleSheet(theme.muted_css())
        sb.addWidget(self.size_note)
        sb.addStretch(1)
        grid.addWidget(sizes_box, 0, 1)

        mats_box = QGroupBox("Linear matrices of each block")
        mb = QVBoxLayout(mats_box)
        self.matrices = self._table(["Matrix", "Out × in", "Parameters"])
        self.matrices.setObjectName("matricesTable")
        mb.addWidget(self.matrices)
        mb.addStretch(1)
        grid.addWidget(mats_box, 1, 1)
        grid.setColumnStretch(0, 1)
        grid.setColumnStretch(1, 1)
        grid.setRowStretch(1, 1)

    def set_recent(self, items: list) -> None:
        """``items``: (text shown, source to open) pairs, newest first."""
        self.recent.clear()
        for item in items:
            text, source = item if isinstance(item, (tuple, list)) else (item, item)
            w = QListWidgetItem(text)
            w.setData(Qt.UserRole, source)
            w.setToolTip(source if source != "default" else "the default model")
            self.recent.addItem(w)
        if not items:
            w = QListWidgetItem("(none yet)")
            w.setFlags(Qt.NoItemFlags)
            self.recent.addItem(w)

    def set_loading(self, text: str) -> None:
        """A note while a model opens; the summary below stays the open model's."""
        self.loading.setText(text)
        self.loading.setVisible(bool(text))

    def set_busy(self, busy: bool) -> None:
        for b in self.open_buttons:
            b.setEnabled(not busy)
        self.source_edit.setEnabled(not busy)
        self.recent.setEnabled(not busy)

    def _open_typed(self) -> None:
        s = self.source_edit.text().strip()
        if s:
            self.open_source.emit(s)

    @staticmethod
    def _table(headers: list[str]) -> QTableWidget:
        t = QTableWidget(0, len(headers))
        t.setHorizontalHeaderLabels(headers)
        t.verticalHeader().setVisible(False)
        t.verticalHeader().setDefaultSectionSize(22)  # compact rows: the tab fits a 760-pixel screen
        t.setEditTriggers(QAbstractItemView.NoEditTriggers)
        t.setSelectionMode(QAbstractItemView.NoSelection)
        t.setFocusPolicy(Qt.NoFocus)
        t.setAlternatingRowColors(True)
        t.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        t.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
        return t

    @staticmethod
    def _fill(table: QTableWidget, rows: list[list[str]]) -> None:
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                item = QTableWidgetItem(text)
                item.setTextAlignment((Qt.AlignLeft if c == 0 else Qt.AlignRight) | Qt.AlignVCenter)
                table.setItem(r, c, item)
        h = table.horizontalHeader().sizeHint().height() + 2 * table.frameWidth()
        h += sum(table.rowHeight(r) for r in range(len(rows)))
        table.setMinimumHeight(h)
        table.setMaximumHeight(h)

    def clear(self, title: str = "No model loaded") -> None:
        self.title.setText(title)
        for v in self.fields.values():
            v.setText("—")
        self._fill(self.sizes, [])
        self._fill(self.matrices, [])
        self.size_note.setText("")

    def show_description(self, d: dict) -> None:
        self.title.setText(f"{d['architecture']} · {d['num_blocks']} blocks · "
                           f"{fmt_params(d['parameters'])} parameters")
        f = self.fields
        src = str(d["source"])
        f["model"].setText(f"the default model ({Path(str(d['path'])).name.split('.')[0]})"
                           if src == "default" else src)
        home = str(Path.home())
        path = str(d["path"])
        f["path"].setText("~" + path[len(home):] if path.startswith(home + "/") else path)
        f["path"].setToolTip(path)
        f["architecture"].setText(str(d["architecture"]))
        f["blocks"].setText(str(d["num_blocks"]))
        f["hidden"].setText(str(d["hidden_size"]))
        f["intermediate"].setText(str(d["intermediate_size"]))
        f["heads"].setText(f"{d['num_heads']} query / {d['num_kv_heads']} key-value, head dim {d['head_dim']}")
        f["vocab"].setText(f"{d['vocab_size']:,}")
        f["embeddings"].setText("tied (head = embedding)" if d["tied_embeddings"] else "untied")
        f["parameters"].setText(f"{d['parameters']:,}  ({fmt_params(d['parameters'])})")
        f["linear"].setText(f"{d['linear_parameters']:,}  ({d['matrices_per_block']} matrices per block)")

        sizes = d["size_bytes"]
        other = sizes["16"] - 2 * d["linear_parameters"]  # embedding, head, norms at 16 bits
        rows = []
        for b in self.SIZE_BITS:
            if b not in sizes:
                continue
            bpw = 16.0 if b == "16" else (sizes[b] - other) * 8 / max(d["linear_parameters"], 1)
            label = "16 bits (float16)" if b == "16" else f"{b} bits"
            rows.append([label, fmt_bytes(sizes[b]), f"{bpw:.2f}", f"{100 * sizes[b] / sizes['16']:.0f} %"])
        self._fill(self.sizes, rows)
        g = 64 if d["hidden_size"] % 64 == 0 else 32
        self.size_note.setText(f"Quantized rows: group {g}, float16 scale and bias per group. "
                               "Embedding, head and norms stay at 16 bits.")
        mats = d["blocks"][0]["matrices"] if d["blocks"] else []
        self._fill(self.matrices, [[m["name"], f"{m['shape'][0]} × {m['shape'][1]}", f"{m['params']:,}"]
                                   for m in mats])
