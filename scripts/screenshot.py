"""Render the main window offscreen on a model (default: the default model) into a PNG.

    python scripts/screenshot.py [--model PATH] [--out resources/screenshots/main.png]

Uses Qt's offscreen platform and QWidget.grab(): no display needed. On Linux, run it with
Debian's OpenBLAS preloaded (as `make` does) for speed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder / .gguf (default: the default model)")
    p.add_argument("--out", default=str(REPO / "resources" / "screenshots" / "main.png"))
    p.add_argument("--size", default="1100x640", help="window size WxH (default 1100x640)")
    p.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args(argv)

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    sys.path.insert(0, str(REPO))
    from PySide6.QtWidgets import QApplication

    from dupstudio.gui.app import MainWindow

    app = QApplication.instance() or QApplication(["dupstudio"])
    app.setApplicationName("dupstudio")
    w, h = (int(x) for x in args.size.lower().split("x"))
    win = MainWindow(args.model)
    win.resize(w, h)
    win.show()
    deadline = time.monotonic() + args.timeout
    try:
        while win.description is None and win.error_message is None:
            if time.monotonic() > deadline:
                print("screenshot: the model did not load in time", file=sys.stderr)
                return 1
            app.processEvents()
            time.sleep(0.02)
        if win.error_message is not None:
            print(f"screenshot: {win.error_message}", file=sys.stderr)
            return 1
        for _ in range(20):  # let layouts settle
            app.processEvents()
            time.sleep(0.01)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not win.grab().save(str(out), "PNG"):
            print(f"screenshot: could not write {out}", file=sys.stderr)
            return 1
        print(out)
        return 0
    finally:
        win.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
