"""dupstudio.core is pure computation: importing all of it never imports Qt or dupstudio.gui."""
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import dupstudio.core

CORE = Path(dupstudio.core.__file__).parent


def test_core_sources_do_not_import_qt():
    pat = re.compile(r"^\s*(from|import)\s+(PySide6|pyqtgraph|shiboken6|dupstudio\.gui)\b", re.M)
    for py in CORE.glob("*.py"):
        m = pat.search(py.read_text())
        assert m is None, f"{py.name} imports {m.group(2)}"


def test_importing_all_of_core_loads_no_qt():
    mods = [f"dupstudio.core.{m.name}" for m in pkgutil.iter_modules([str(CORE)])]
    code = ("import sys, importlib\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "bad = [m for m in sys.modules if m.startswith(('PySide6', 'pyqtgraph', 'dupstudio.gui'))]\n"
            "print(bad); sys.exit(1 if bad else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
