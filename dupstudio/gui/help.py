"""Help ▸ User guide (the Markdown guide in docs/, shown in the app) and Help ▸ Keyboard shortcuts."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QDialog,
    QDialogButtonBox,
    QHeaderView,
    QLineEdit,
    QTableWidget,
    QTableWidgetItem,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from dupstudio.gui.widgets import install_copy

GUIDE_NAME = "user-guide.md"


def guide_path() -> Optional[Path]:
    """docs/user-guide.md of a checkout, or beside a packaged app's resources."""
    roots = []
    base = getattr(sys, "_MEIPASS", None)
    if base:
        roots += [Path(base) / "docs", Path(base)]
    roots.append(Path(__file__).resolve().parents[2] / "docs")
    for r in roots:
        if (r / GUIDE_NAME).is_file():
            return r / GUIDE_NAME
    return None


def guide_markdown() -> str:
    p = guide_path()
    if p is None:
        return ("# dupstudio user guide\n\nThe guide is not installed with this copy of dupstudio; it is the "
                "file docs/user-guide.md of dupstudio's source tree.")
    return p.read_text(encoding="utf-8")


class GuideWindow(QDialog):
    """The user guide, rendered from Markdown, with a find box."""

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("dupstudio user guide")
        self.setModal(False)
        self.resize(820, 680)
        lay = QVBoxLayout(self)
        self.find = QLineEdit()
        self.find.setPlaceholderText("Find in the guide (Enter: next)")
        self.find.returnPressed.connect(self._find_next)
        lay.addWidget(self.find)
        self.browser = QTextBrowser()
        self.browser.setObjectName("userGuide")
        self.browser.setOpenExternalLinks(True)
        p = guide_path()
        if p is not None:
            self.browser.setSearchPaths([str(p.parent)])
        self.browser.setMarkdown(guide_markdown())
        lay.addWidget(self.browser, 1)
        bb = QDialogButtonBox(QDialogButtonBox.Close)
        bb.rejected.connect(self.close)
        lay.addWidget(bb)
        if parent is not None and parent.screen() is not None:
            avail = parent.screen().availableGeometry()
            self.resize(min(self.width(), avail.width() - 40), min(self.height(), avail.height() - 60))

    def headings(self) -> list:
        return [line.lstrip("#").strip() for line in self.browser.toMarkdown().splitlines() if line.startswith("#")]

    def _find_next(self) -> None:
        text = self.find.text()
        if text and not self.browser.find(text):
            cursor = self.browser.textCursor()
            cursor.movePosition(cursor.MoveOperation.Start)
            self.browser.setTextCursor(cursor)
            self.browser.find(text)


class ShortcutsDialog(QDialog):
    def __init__(self, rows: list, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Keyboard shortcuts")
        self.resize(620, 560)
        lay = QVBoxLayout(self)
        self.table = QTableWidget(len(rows), 3)
        self.table.setObjectName("shortcutsTable")
        self.table.setHorizontalHeaderLabels(["Where", "What", "Keys"])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        hh = self.table.horizontalHeader()
        hh.setSectionResizeMode(0, QHeaderView.ResizeToContents)
        hh.setSectionResizeMode(1, QHeaderView.Stretch)
        hh.setSectionResizeMode(2, QHeaderView.ResizeToContents)
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                item = QTableWidgetItem(text)
                if c == 2:
                    item.setTextAlignment(Qt.AlignLeft | Qt.AlignVCenter)
                self.table.setItem(r, c, item)
        install_copy(self.table)
        lay.addWidget(self.table, 1)
        bb = QDialogButtonBox(QDialogButtonBox.Close)
        bb.rejected.connect(self.close)
        lay.addWidget(bb)

    def keys(self) -> dict:
        return {self.table.item(r, 1).text(): self.table.item(r, 2).text() for r in range(self.table.rowCount())}
