"""Render every tab of the main window offscreen into ``resources/screenshots/<tab>.png``.

    python scripts/screenshots.py [--model PATH] [--out resources/screenshots] [--size 1400x900]

Default model: the default model (SmolLM2-135M, ``open_model(None)``). The script drives the
window as a user would: replicates a few blocks, calibrates (fast, few tokens), evaluates the
float model and the configuration on a few windows, generates side by side, measures decode
latency, runs Tools ▸ Sensitivity… (few tokens), then grabs each tab (and the sensitivity dock)
with ``QWidget.grab()`` (Qt's offscreen platform; no display needed; pyqtgraph's SVG export is
broken on recent PySide6, so PNG). Settings go to a temporary file,
never the user's. On Linux run it with OpenBLAS preloaded (as `make` does) for speed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _text(candidates) -> str | None:
    for c in candidates:
        if c and Path(c).is_file():
            return str(c)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder / .gguf (default: the default model)")
    p.add_argument("--out", default=str(REPO / "resources" / "screenshots"))
    p.add_argument("--size", default="1400x900", help="window size WxH (default 1400x900)")
    p.add_argument("--calib-text", default=None, help="calibration text (default: resources/calibration, "
                                                      "else ../shared/data/wikitext2-valid.txt)")
    p.add_argument("--eval-text", default=None, help="evaluation text (default: ../shared/data/wikitext2-test.txt)")
    p.add_argument("--tabs", default="all", help="comma-separated tabs (and the sensitivity dock) to grab (default all)")
    p.add_argument("--timeout", type=float, default=1800.0)
    args = p.parse_args(argv)

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    sys.path.insert(0, str(REPO))
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from dupstudio.gui.main_window import TABS, MainWindow
    from dupstudio.gui.panels.calibration import default_calibration_text

    app = QApplication.instance() or QApplication(["dupstudio"])
    app.setApplicationName("dupstudio")
    tmp = tempfile.mkdtemp(prefix="dupstudio-shots-")
    settings = QSettings(str(Path(tmp) / "settings.ini"), QSettings.IniFormat)
    w, h = (int(x) for x in args.size.lower().split("x"))
    win = MainWindow(args.model, settings=settings)
    win.resize(w, h)
    win.show()
    deadline = time.monotonic() + args.timeout
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = ("sensitivity",)  # docks, not tabs
    wanted = TABS + extra if args.tabs == "all" else tuple(t.strip() for t in args.tabs.split(","))

    def pump(cond, what: str, limit: float | None = None) -> None:
        end = min(deadline, time.monotonic() + limit) if limit else deadline
        while not cond():
            if time.monotonic() > end:
                raise TimeoutError(f"timed out waiting for {what}")
            app.processEvents()
            time.sleep(0.01)
        for _ in range(10):
            app.processEvents()
            time.sleep(0.01)

    def grab(tab: str) -> None:
        if tab not in wanted:
            return
        win.tabs.setCurrentIndex(TABS.index(tab))
        pump(lambda: True, "layout")
        for _ in range(30):
            app.processEvents()
            time.sleep(0.01)
        path = out / f"{tab}.png"
        if not win.grab().save(str(path), "PNG"):
            raise OSError(f"could not write {path}")
        print(path, flush=True)

    try:
        pump(lambda: win.description is not None or win.error_message is not None, "the model")
        if win.error_message:
            print(f"screenshots: {win.error_message}", file=sys.stderr)
            return 1
        proj = win.project
        n = proj.num_blocks
        grab("model")

        # a configuration worth looking at: K = 2 (serial, lsq init) on a few blocks
        reps = sorted({0, 1, n // 2, n - 2, n - 1} & set(range(n)))
        proj.edit_blocks(reps, "replicas", 2)
        proj.edit_blocks(reps, "init", "lsq")
        proj.edit_blocks([n // 3], "strategy", "search")
        win.layers.apply_bar.select_rows(reps)

        # calibration
        text = args.calib_text or _text([default_calibration_text(), SHARED_DATA / "wikitext2-valid.txt"])
        cal = win.calibration
        if text:
            cal.text.set_path(text)
            cal.resume.setChecked(False)  # show a real loss curve, not a resumed run
            cal.set_settings(method="adam", preset="fast", steps=12, seqs=4, seq_len=128, batch=4)
            done = []
            cal.finished.connect(done.append)
            win.tabs.setCurrentIndex(TABS.index("calibration"))
            cal.start()
            pump(lambda: bool(done), "the calibration")
            print(f"calibration: {done[0]} — {cal.last_message}", flush=True)
        pump(win.metrics_idle, "the weight errors")
        win.layers.apply_bar.select_rows(reps)
        grab("layers")

        win.tabs.setCurrentIndex(TABS.index("distributions"))
        d = win.distributions
        d.show_block(reps[0], "down_proj")
        got = []
        d.detail_ready.connect(got.append)
        d.schedule()
        pump(lambda: bool(got) and not d._timer.isActive(), "the distributions")
        pump(lambda: d.detail is not None and d.detail["block"] == reps[0], "the chosen matrix")
        grab("distributions")
        grab("calibration")

        # evaluation: float model, then the configuration
        etext = args.eval_text or _text([SHARED_DATA / "wikitext2-test.txt", text])
        ev = win.evaluation
        if etext:
            ev.text.set_path(etext)
            ev.windows.setValue(4)
            ev.ctx.setValue(256)
            states = []
            ev.finished.connect(states.append)
            ev.start(full_precision=True)
            pump(lambda: len(states) == 1, "the float evaluation")
            ev.start()
            pump(lambda: len(states) == 2, "the evaluation")
        grab("evaluation")

        g = win.generation
        g.max_tokens.setValue(40)
        g.prompt.setPlainText("What is the capital of France?")
        gen = []
        g.finished.connect(gen.append)
        win.tabs.setCurrentIndex(TABS.index("generation"))
        g.start()
        pump(lambda: bool(gen), "the generation")
        grab("generation")

        r = win.roofline
        win.tabs.setCurrentIndex(TABS.index("roofline"))
        meas = []
        r.measured_ready.connect(meas.append)
        r.measure()
        pump(lambda: bool(meas), "the decode measurement")
        grab("roofline")

        # Tools ▸ Sensitivity… (a dock): every block, few tokens, then "use the result"
        if "sensitivity" in wanted and text:
            from dupstudio.core.calibrate import settings_from

            sens = []
            win.sensitivity_finished.connect(sens.append)
            win.run_sensitivity({"text": text, "blocks": None, "mode": "serial", "with_replica": True,
                                 "kl_windows": 2, "settings": settings_from("fast", steps=8, seqs=4, seq_len=128,
                                                                             batch=4)})
            pump(lambda: bool(sens), "the sensitivity")
            print(f"sensitivity: {sens[0]} — {win.status_text()}", flush=True)
            dock = win.sensitivity_dock
            dock.setFloating(True)
            dock.resize(900, 820)
            pump(lambda: True, "layout")
            path = out / "sensitivity.png"
            if not dock.grab().save(str(path), "PNG"):
                raise OSError(f"could not write {path}")
            print(path, flush=True)
        return 0
    except TimeoutError as e:
        print(f"screenshots: {e}", file=sys.stderr)
        return 1
    finally:
        win.project.undo_stack.setClean()
        win.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
