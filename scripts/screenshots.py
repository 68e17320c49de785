"""Screenshots of every tab of the main window, on a real X server, at one or more window sizes.

    python scripts/screenshots.py                       # Xvfb, 1280x760 and 1600x1000 -> docs/screenshots/
    python scripts/screenshots.py --sizes 1280x760 --tabs roofline,layers
    python scripts/screenshots.py --no-xvfb --sizes 1400x900   # the current display (or offscreen)

For each size the script starts its own Xvfb screen of exactly that size (``xvfb-run``; Debian:
``apt-get install xvfb xauth``), places the window over the whole screen, and drives it as a user
would: opens the default model (SmolLM2-135M), gives a few blocks a second replica, calibrates the
selected ones (fast preset, few tokens), evaluates the float model and the configuration, generates
side by side, measures this machine for the roofline, runs Tools ▸ Sensitivity… on a few blocks,
opens the History dock and Help ▸ User guide, and grabs each view with ``QWidget.grab()`` into
``<out>/<W>x<H>/<view>.png`` (palette-reduced PNGs when ImageMagick's ``convert`` is installed),
and a few views again in the dark palette into ``<out>/<W>x<H>-dark/``.
Settings go to a temporary file, never the user's. On Linux, preload OpenBLAS as ``make`` does.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
VIEWS = ("model", "layers", "distributions", "calibration", "evaluation", "generation", "roofline",
         "sensitivity", "history", "guide")


def _text(candidates) -> str | None:
    for c in candidates:
        if c and Path(c).is_file():
            return str(c)
    return None


def _shrink(path: Path) -> None:
    """A 256-colour palette PNG (a third of the size, indistinguishable for a UI)."""
    if shutil.which("convert"):
        tmp = path.with_suffix(".tmp.png")
        r = subprocess.run(["convert", str(path), "-colors", "256", "-strip", f"PNG8:{tmp}"], capture_output=True)
        if r.returncode == 0 and tmp.exists() and tmp.stat().st_size < path.stat().st_size:
            tmp.replace(path)
        elif tmp.exists():
            tmp.unlink()


def run_one(args, size: str) -> int:
    """Take the screenshots at one size in this process (on the display Qt finds)."""
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    sys.path.insert(0, str(REPO))
    from dupstudio.gui import theme
    from dupstudio.gui.main_window import TABS, MainWindow
    from dupstudio.gui.panels.calibration import default_calibration_text

    app = QApplication.instance() or QApplication(["dupstudio"])
    app.setApplicationName("dupstudio")
    theme.apply(app)
    tmp = tempfile.mkdtemp(prefix="dupstudio-shots-")
    settings = QSettings(str(Path(tmp) / "settings.ini"), QSettings.IniFormat)
    w, h = (int(x) for x in size.lower().split("x"))
    win = MainWindow(args.model, settings=settings, remember_models=False)
    screen = app.primaryScreen().availableGeometry()
    win.setGeometry(screen.x(), screen.y(), min(w, screen.width()), min(h, screen.height()))
    win.show()
    deadline = time.monotonic() + args.timeout
    out = Path(args.out) / (args.subdir or size)
    out.mkdir(parents=True, exist_ok=True)
    wanted = VIEWS if args.tabs == "all" else tuple(t.strip() for t in args.tabs.split(","))
    print(f"{size}: platform {app.platformName()}, screen {screen.width()}x{screen.height()}, "
          f"window {win.width()}x{win.height()} (minimum {win.minimumSizeHint().width()}x"
          f"{win.minimumSizeHint().height()})", flush=True)

    def pump(cond, what: str, limit: float | None = None) -> None:
        end = min(deadline, time.monotonic() + limit) if limit else deadline
        while not cond():
            if time.monotonic() > end:
                raise TimeoutError(f"timed out waiting for {what}")
            app.processEvents()
            time.sleep(0.01)
        for _ in range(20):
            app.processEvents()
            time.sleep(0.01)

    def save(widget, name: str) -> None:
        path = out / f"{name}.png"
        if not widget.grab().save(str(path), "PNG"):
            raise OSError(f"could not write {path}")
        _shrink(path)
        print(path, f"{path.stat().st_size // 1024} KB", flush=True)

    def grab(tab: str) -> None:
        if tab not in wanted:
            return
        win.tabs.setCurrentIndex(TABS.index(tab))
        pump(lambda: True, "layout")
        save(win, tab)

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

        # calibration of the selected blocks
        text = args.calib_text or _text([default_calibration_text(), SHARED_DATA / "wikitext2-valid.txt"])
        cal = win.calibration
        if text and any(v in wanted for v in ("calibration", "layers", "evaluation")):
            cal.text.set_path(text)
            cal.resume.setChecked(False)  # show a real loss curve, not a resumed run
            cal.set_settings(method="adam", preset="fast", steps=12, seqs=4, seq_len=128, batch=4)
            cal.selected_blocks.setChecked(True)
            done = []
            cal.finished.connect(done.append)
            win.tabs.setCurrentIndex(TABS.index("calibration"))
            cal.start()
            pump(lambda: bool(done), "the calibration")
            print(f"calibration: {done[0]} — {cal.last_message}", flush=True)
        pump(win.metrics_idle, "the weight errors")
        win.layers.apply_bar.select_rows(reps)
        grab("layers")

        if "distributions" in wanted:
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

        # evaluation: float model, then the configuration (on a text that is not the calibration text)
        etext = args.eval_text or _text([SHARED_DATA / "wikitext2-test.txt"])
        ev = win.evaluation
        if etext and "evaluation" in wanted:
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

        if "generation" in wanted:
            g = win.generation
            g.max_tokens.setValue(40)
            g.prompt.setPlainText("What is the capital of France?")
            gen = []
            g.finished.connect(gen.append)
            win.tabs.setCurrentIndex(TABS.index("generation"))
            g.start()
            pump(lambda: bool(gen), "the generation")
            grab("generation")

        if "roofline" in wanted:
            r = win.roofline
            win.tabs.setCurrentIndex(TABS.index("roofline"))
            meas = []
            r.measured_ready.connect(meas.append)
            if r.machine_prof is None:
                r.measure_all()  # the micro-benchmark (about half a minute on 2 cores), then decode
            else:
                r.measure()
            pump(lambda: bool(meas), "the measurements")
            r.set_mode("both")
            grab("roofline")

        # Tools ▸ Sensitivity… (a dock): a few blocks, few tokens
        if "sensitivity" in wanted and text:
            from dupstudio.core.calibrate import settings_from

            sens = []
            win.sensitivity_finished.connect(sens.append)
            win.run_sensitivity({"text": text, "blocks": f"0-{min(n, 4) - 1}", "mode": "serial", "with_replica": True,
                                 "kl_windows": 2, "settings": settings_from("fast", steps=6, seqs=4, seq_len=128,
                                                                             batch=4)})
            pump(lambda: bool(sens), "the sensitivity")
            print(f"sensitivity: {sens[0]} — {win.status_text()}", flush=True)
            win.tabs.setCurrentIndex(TABS.index("layers"))
            pump(lambda: True, "layout")
            save(win, "sensitivity")
            win.sensitivity_dock.hide()
        if "history" in wanted:
            win.history.show()
            win.tabs.setCurrentIndex(TABS.index("layers"))
            pump(lambda: True, "layout")
            save(win, "history")
            win.history.hide()
        if "guide" in wanted:
            guide = win.show_user_guide()
            pump(lambda: True, "layout")
            save(guide, "guide")
            guide.close()
        return 0
    except TimeoutError as e:
        print(f"screenshots: {e}", file=sys.stderr)
        return 1
    finally:
        win.project.undo_stack.setClean()
        win.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder / .gguf (default: the default model)")
    p.add_argument("--out", default=str(REPO / "docs" / "screenshots"))
    p.add_argument("--sizes", default="1280x760,1600x1000", help="window sizes WxH, comma-separated")
    p.add_argument("--calib-text", default=None, help="calibration text (default: resources/calibration, "
                                                      "else ../shared/data/wikitext2-valid.txt)")
    p.add_argument("--eval-text", default=None, help="evaluation text (default: ../shared/data/wikitext2-test.txt)")
    p.add_argument("--tabs", default="all", help=f"comma-separated views to grab (default all: {', '.join(VIEWS)})")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--dark", default="distributions,roofline",
                   help="views grabbed again in the dark palette, at the first size, into <W>x<H>-dark/ "
                        "(empty: none)")
    p.add_argument("--no-xvfb", action="store_true", help="use the current display (or Qt's offscreen platform)")
    p.add_argument("--subdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if args.child or args.no_xvfb:
        if not args.child and not os.environ.get("DISPLAY"):
            os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
        return max(run_one(args, s) for s in sizes)
    if not shutil.which("xvfb-run"):
        print("screenshots: xvfb-run is missing (Debian: apt-get install xvfb xauth); or pass --no-xvfb",
              file=sys.stderr)
        return 1
    runs = [(s, args.tabs, None, {}) for s in sizes]
    if args.dark.strip():
        runs.append((sizes[0], args.dark, f"{sizes[0]}-dark", {"DUPSTUDIO_THEME": "dark"}))
    code = 0
    for s, tabs, subdir, extra_env in runs:
        w, h = s.lower().split("x")
        cmd = ["xvfb-run", "-a", "-s", f"-screen 0 {w}x{h}x24", sys.executable, str(Path(__file__).resolve()),
               "--child", "--sizes", s, "--out", args.out, "--tabs", tabs, "--timeout", str(args.timeout)]
        if subdir:
            cmd += ["--subdir", subdir]
        for opt in ("model", "calib_text", "eval_text"):
            if getattr(args, opt):
                cmd += [f"--{opt.replace('_', '-')}", str(getattr(args, opt))]
        env = dict(os.environ, QT_QPA_PLATFORM="xcb", **extra_env)
        code = max(code, subprocess.call(cmd, env=env))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
