"""Entry point of the packaged app (PyInstaller): the same as the ``dupstudio`` console script.

No arguments open the GUI; ``--self-test`` and the sub-commands work as in a checkout. Before
handing over to :func:`dupstudio.cli.main`, a failure to convert the *bundled* default model (first
start: it is written once into the user's cache) is turned into a message that says what happened
and what to do, in the CLI's error line and in the window alike. Nothing here imports MLX, so the
CLI's OpenBLAS re-exec on Linux still happens before MLX loads.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def _explain_bundled_conversion_failures() -> None:
    bundled = os.environ.get("DUPSTUDIO_BUNDLED_GGUF")
    if not bundled:
        return
    from dupstudio.core import model_io
    from dupstudio.core.jobs import Cancelled, DupstudioError

    original = model_io.ensure_converted
    if getattr(original, "_dupstudio_bundle_wrapper", False):
        return

    def ensure_converted(gguf, progress=None, cancel=None):
        try:
            return original(gguf, progress, cancel)
        except (Cancelled, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with an explanation, chained
            try:
                ours = Path(gguf).resolve() == Path(bundled).resolve()
            except OSError:
                ours = False
            if not ours:
                raise
            detail = " ".join(str(e).split()) or type(e).__name__
            raise DupstudioError(
                f"could not convert the bundled default model ({Path(bundled).name}) into "
                f"{model_io.models_dir()} ({type(e).__name__}: {detail}). The conversion runs once, "
                "at first start, and needs about 600 MB free there: free some space or set "
                "DUPSTUDIO_HOME to a writable folder, then start dupstudio again. Other models "
                "(a model folder or a .gguf file) can still be opened."
            ) from e

    ensure_converted._dupstudio_bundle_wrapper = True  # type: ignore[attr-defined]
    model_io.ensure_converted = ensure_converted


def main() -> int:
    _explain_bundled_conversion_failures()
    from dupstudio.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
