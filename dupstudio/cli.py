"""Command-line interface: ``dupstudio <command> ...``; no command opens the GUI.

Each sub-command lives in ``dupstudio/commands/<name>.py`` and exposes ``register(subparsers)``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
COMMANDS = [
    "info",
    "generate",
    "quant_report",
    "config",
    "calibrate",
    "eval",
    "roofline",
    "bench",
    "export",
    "sweep",
    "sensitivity",
]


def _ensure_openblas() -> None:
    """On Linux, re-exec once with Debian's OpenBLAS preloaded (MLX's CPU matmul ~25x faster)."""
    if not sys.platform.startswith("linux") or os.environ.get("DUPSTUDIO_NO_PRELOAD"):
        return
    if "openblas" in os.environ.get("LD_PRELOAD", "") or not os.path.exists(OPENBLAS):
        return
    if "mlx" in sys.modules:  # too late to preload
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = (OPENBLAS + " " + env.get("LD_PRELOAD", "")).strip()
    env["DUPSTUDIO_NO_PRELOAD"] = "1"
    # A frozen app (PyInstaller) is its own interpreter and takes no `-m`: re-run it as it was run.
    if getattr(sys, "frozen", False):
        argv = [sys.executable, *sys.argv[1:]]
    else:
        argv = [sys.executable, "-m", "dupstudio", *sys.argv[1:]]
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        return


def build_parser() -> argparse.ArgumentParser:
    from dupstudio import __version__

    p = argparse.ArgumentParser(prog="dupstudio", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"dupstudio {__version__}")
    p.add_argument("--self-test", action="store_true", help="headless check of the installation")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"dupstudio.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"dupstudio.commands.{name}":
                continue  # command not built yet
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        _ensure_openblas()
        argv = sys.argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    from dupstudio.core.jobs import Cancelled, DupstudioError

    try:
        if args.self_test:
            from dupstudio.selftest import run_self_test

            return run_self_test()
        if not args.command:
            from dupstudio.gui.app import run_gui

            return run_gui()
        return int(args.func(args) or 0)
    except DupstudioError as e:
        print(f"dupstudio: error: {e}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        print("dupstudio: cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
