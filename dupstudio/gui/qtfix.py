"""Work around a reference-counting bug of PySide6 6.12.0 on CPython < 3.12.

Every Python-side ``SignalInstance.emit()`` returns ``True`` (or ``False``) without taking a
reference to it, so each emit drops one reference the interpreter owns. After a few thousand
emits (pyqtgraph emits on every redraw, the worker on every progress report) the count reaches
zero and the process aborts with ``Fatal Python error: bool_dealloc: deallocating True or False``
(reproduced with a bare ``QObject`` + ``Signal`` emitted 600 times, no other library loaded).

CPython 3.12+ makes ``True``/``False``/``None`` immortal, so the stray decrefs are harmless there.
On older interpreters :func:`apply` probes for the leak and, if present, gives the two booleans
(and ``None``, for safety) a huge reference count so they can never reach zero. The objects are
never freed anyway; the only effect is that the bug cannot kill the process.
"""
from __future__ import annotations

import ctypes
import sys

_applied = False
PIN = 1 << 40


def emit_drops_true() -> bool:
    """True when emitting a Python-defined signal loses a reference to ``True``."""
    from PySide6.QtCore import QObject, Signal

    class _Probe(QObject):
        ping = Signal()

    p = _Probe()
    p.ping.connect(lambda: None)
    before = sys.getrefcount(True)
    for _ in range(8):
        p.ping.emit()
    after = sys.getrefcount(True)
    return after < before


def apply() -> bool:
    """Pin the singletons when needed; returns True when the workaround is active."""
    global _applied
    if _applied:
        return True
    if sys.version_info >= (3, 12) or getattr(sys, "implementation", None) and sys.implementation.name != "cpython":
        return False
    if not emit_drops_true():
        return False
    for obj in (True, False, None):
        ctypes.c_ssize_t.from_address(id(obj)).value += PIN
    _applied = True
    return True


apply()
