"""Generation tab: stream text from the current configuration (deploy mode: packed codes shared by
the replicas) and, side by side, from the float model (perplexity alone hides broken 2-bit text,
so the two are read next to each other)."""
from __future__ import annotations

from typing import Optional

from PySide6.QtCore import Signal
from PySide6.QtGui import QFont, QTextCursor
from PySide6.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from dupstudio.gui import tasks, theme
from dupstudio.gui.project import Project, config_summary, snapshot
from dupstudio.gui.widgets import JobBar

DEFAULT_PROMPT = "Write a short paragraph about the history of Paris."


class _Output(QGroupBox):
    def __init__(self, title: str) -> None:
        super().__init__(title)
        lay = QVBoxLayout(self)
        self.subtitle = QLabel("")
        self.subtitle.setWordWrap(True)
        self.subtitle.setStyleSheet(theme.muted_css())
        lay.addWidget(self.subtitle)
        self.text = QPlainTextEdit()
        self.text.setReadOnly(True)
        f = QFont()
        f.setPointSize(10)
        self.text.setFont(f)
        lay.addWidget(self.text, 1)
        self.stats = QLabel("")
        self.stats.setStyleSheet(theme.muted_css())
        lay.addWidget(self.stats)

    def clear(self) -> None:
        self.text.clear()
        self.stats.setText("")

    def append(self, s: str) -> None:
        c = self.text.textCursor()
        c.movePosition(QTextCursor.End)
        c.insertText(s)
        self.text.setTextCursor(c)
        self.text.ensureCursorVisible()


class GenerationPanel(QWidget):
    finished = Signal(str)  # "done", "stopped", "failed"
    token_received = Signal(str)  # which output got text ("config" / "fp")

    def __init__(self, project: Project, window, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.project, self.window = project, window
        self.job = None
        self.stats: dict = {}
        lay = QVBoxLayout(self)

        self.prompt = QPlainTextEdit()
        self.prompt.setPlaceholderText("Prompt…")
        self.prompt.setPlainText(DEFAULT_PROMPT)
        self.prompt.setMaximumHeight(80)
        lay.addWidget(QLabel("Prompt"))
        lay.addWidget(self.prompt)

        row = QHBoxLayout()
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(1, 8192)
        self.max_tokens.setValue(128)
        self.temp = QDoubleSpinBox()
        self.temp.setRange(0.0, 5.0)
        self.temp.setSingleStep(0.1)
        self.temp.setToolTip("0 = greedy")
        self.chat = QCheckBox("Chat template")
        self.chat.setChecked(True)
        self.chat.setToolTip("Wrap the prompt in the model's chat template (when it has one)")
        self.side = QCheckBox("Side by side with full precision")
        self.side.setChecked(True)
        for label, w in (("Max tokens", self.max_tokens), ("Temperature", self.temp)):
            row.addWidget(QLabel(label))
            row.addWidget(w)
            row.addSpacing(8)
        row.addWidget(self.chat)
        row.addWidget(self.side)
        row.addStretch(1)
        self.go = QPushButton("Generate")
        self.go.setDefault(True)
        self.go.clicked.connect(self.start)
        row.addWidget(self.go)
        lay.addLayout(row)

        self.bar = JobBar("Stop")
        self.bar.cancel_clicked.connect(self.stop)
        self.stop_button = self.bar.cancel
        lay.addWidget(self.bar)

        split = QSplitter()
        self.outputs = {"config": _Output("This configuration (deploy mode)"),
                        "fp": _Output("Full precision")}
        split.addWidget(self.outputs["config"])
        split.addWidget(self.outputs["fp"])
        split.setStretchFactor(0, 1)
        split.setStretchFactor(1, 1)
        split.setSizes([1000, 1000])
        self.outputs["config"].setMinimumWidth(200)
        lay.addWidget(split, 1)
        self.side.toggled.connect(self.outputs["fp"].setVisible)
        project.model_changed.connect(self._sync)
        self._sync()

    def _sync(self) -> None:
        running = self.job is not None and self.job.active
        self.go.setEnabled(self.project.has_model and not running)

    def text(self, which: str = "config") -> str:
        return self.outputs[which].text.toPlainText()

    def start(self) -> bool:
        p = self.project
        if not p.has_model or (self.job is not None and self.job.active):
            return False
        prompt = self.prompt.toPlainText().strip()
        if not prompt:
            self.window.show_error("The prompt is empty.")
            return False
        for o in self.outputs.values():
            o.clear()
        self.outputs["config"].subtitle.setText(config_summary(p.config))
        self.outputs["fp"].subtitle.setText("the model's own float weights")
        self.stats = {}
        cfg = snapshot(p.config)
        tok = getattr(p.loaded, "tokenizer", None)
        chat = bool(self.chat.isChecked() and getattr(tok, "chat_template", None))
        self.bar.running("Building the configuration…")
        self.job = self.window.runner.submit(
            tasks.generate_job(p.loaded, cfg, p.revision, self.window.build_cache, prompt, self.max_tokens.value(),
                               chat, float(self.temp.value()), self.side.isChecked()),
            name="generation", on_event=self._event, on_done=self._done, on_error=self._failed,
            on_progress=self.bar.progress)
        self.window.settings.setValue("generation/prompt", prompt)
        self._sync()
        return True

    def stop(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def _event(self, ev) -> None:
        kind = ev[0]
        if kind == "start":
            self.outputs[ev[1]].stats.setText("generating…")
        elif kind == "chunk":
            _, which, text, ntok, tps = ev
            self.outputs[which].append(text)
            self.outputs[which].stats.setText(f"{ntok} tokens · {tps:.1f} tokens/s")
            if text:
                self.token_received.emit(which)
        elif kind == "end":
            _, which, reason, ntok, tps = ev
            why = {"stop": "end of text", "length": "max tokens"}.get(reason, reason or "")
            self.outputs[which].stats.setText(f"{ntok} tokens · {tps:.1f} tokens/s · {why}")

    def _done(self, stats: dict) -> None:
        self.job = None
        self.stats = stats
        c = stats.get("config", {})
        self.bar.idle(f"Done: {c.get('tokens', 0)} tokens at {c.get('tps', 0):.1f} tokens/s "
                      f"(configuration, deploy mode)", done=True)
        self._sync()
        self.finished.emit("done")

    def _failed(self, message: str) -> None:
        self.job = None
        if message == "cancelled":
            self.bar.idle("Stopped")
            for o in self.outputs.values():
                if o.stats.text() == "generating…" or o.stats.text().endswith("tokens/s"):
                    o.stats.setText(o.stats.text() + " · stopped")
            self.finished.emit("stopped")
        else:
            self.bar.idle(f"Generation failed: {message}")
            self.window.show_error(f"Generation failed: {message}")
            self.finished.emit("failed")
        self._sync()
