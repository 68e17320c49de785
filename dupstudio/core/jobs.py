"""Progress reporting and cancellation shared by every long core function.

Every long-running core function takes ``progress`` (a callable ``(fraction, message)``,
fraction in [0, 1] or ``None`` when unknown) and ``cancel`` (a :class:`CancelToken`).
It calls ``cancel.check()`` at safe points; that raises :class:`Cancelled`.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional

ProgressFn = Callable[[Optional[float], str], None]


class Cancelled(Exception):
    """Raised inside a core function when its CancelToken was set."""


class DupstudioError(Exception):
    """A user-facing error: the message names the problem (and the path, where there is one)."""


class CancelToken:
    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled")


def no_progress(fraction: Optional[float], message: str) -> None:  # pragma: no cover - trivial
    pass


def ensure(progress: Optional[ProgressFn], cancel: Optional[CancelToken]):
    """Normalise optional progress/cancel arguments."""
    return (progress or no_progress), (cancel or CancelToken())
