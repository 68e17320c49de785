# PyInstaller runtime hook: runs inside the packaged app before dupstudio is imported.
#
# The app bundles the default model's GGUF under resources/models/ and converts it
# into the user's cache at first start. dupstudio.core.model_io.default_gguf_path() reads
# $DUPSTUDIO_DEFAULT_GGUF, so point it at the bundled file (a value the user set wins).
# $DUPSTUDIO_BUNDLED_GGUF tells packaging/dupstudio_main.py which file is the bundled one, so that
# a failed conversion of it gets a clear message.
import os
import sys
from pathlib import Path

_base = Path(getattr(sys, "_MEIPASS", Path(sys.executable).resolve().parent))
_gguf = _base / "resources" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
if _gguf.is_file():
    os.environ.setdefault("DUPSTUDIO_DEFAULT_GGUF", str(_gguf))
    os.environ["DUPSTUDIO_BUNDLED_GGUF"] = str(_gguf)
