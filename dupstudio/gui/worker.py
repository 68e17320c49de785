"""The one MLX worker thread and the jobs it runs.

MLX arrays built lazily on one thread cannot be evaluated on another, so *all* MLX work (load,
build, quantize, calibrate, evaluate, generate, save) runs on a single Python thread owned by
:class:`JobRunner`. The GUI thread submits plain callables and gets back plain Python / numpy values
through Qt signals (queued connections: the runner lives on the GUI thread, the signals are emitted
from the worker thread).

A job is ``fn(progress, cancel)`` or ``fn(progress, cancel, emit)``:

* ``progress(fraction | None, message)`` — the core's progress callable (throttled to ~20 Hz);
* ``cancel`` — a :class:`~dupstudio.core.jobs.CancelToken` of its own;
* ``emit(value)`` — streams intermediate values (loss points, generated text) to ``on_event``.

Its return value goes to ``on_done``; :class:`DupstudioError`, :class:`Cancelled` and any other
exception become ``on_error(message)`` (never a crash). Jobs run one at a time in priority order
(foreground before background, FIFO within a priority); a queued job that is cancelled is skipped.

The thread itself (:class:`MlxThread`) is one per process and never exits: MLX keeps thread-local
state whose destructor takes the GIL, and a thread that ends while the interpreter finalises (or
while another thread collects garbage) aborts or crashes the process. Each window has its own
:class:`JobRunner` (job bookkeeping and signals) in front of that one thread.
"""
from __future__ import annotations

import inspect
import itertools
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from PySide6.QtCore import QObject, Signal, Slot

from dupstudio.core.jobs import CancelToken, Cancelled, DupstudioError

FOREGROUND = 0
BACKGROUND = 10
PROGRESS_INTERVAL_S = 0.05


@dataclass(eq=False)
class Job:
    id: int
    name: str
    fn: Callable
    priority: int = FOREGROUND
    on_done: Optional[Callable[[Any], None]] = None
    on_error: Optional[Callable[[str], None]] = None
    on_progress: Optional[Callable[[Optional[float], str], None]] = None
    on_event: Optional[Callable[[Any], None]] = None
    cancel_token: CancelToken = field(default_factory=CancelToken)
    state: str = "queued"  # queued, running, done, failed, cancelled
    error: Optional[str] = None
    seconds: float = 0.0

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    @property
    def background(self) -> bool:
        return self.priority >= BACKGROUND

    def cancel(self) -> None:
        self.cancel_token.cancel()


def _arity(fn: Callable) -> int:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 2
    params = [p for p in sig.parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()):
        return 3
    return len(params)


def error_message(e: BaseException) -> str:
    """A one-paragraph, user-facing message for an exception raised by a job."""
    if isinstance(e, DupstudioError):
        return str(e)
    if isinstance(e, Cancelled):
        return "cancelled"
    if isinstance(e, MemoryError):
        return "out of memory"
    text = " ".join(str(e).split())
    return f"unexpected error: {type(e).__name__}: {text}" if text else f"unexpected error: {type(e).__name__}"


class MlxThread:
    """The process-wide MLX worker thread (a daemon that blocks on its queue until the process ends)."""

    _instance: Optional["MlxThread"] = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.queue: "queue.PriorityQueue" = queue.PriorityQueue()
        self.seq = itertools.count()
        self.ident: Optional[int] = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="mlx-worker", daemon=True)
        self.thread.start()
        self._ready.wait(5.0)

    @classmethod
    def get(cls) -> "MlxThread":
        with cls._lock:
            if cls._instance is None:
                cls._instance = MlxThread()
            return cls._instance

    def put(self, priority: int, runner: "JobRunner", job: "Job") -> None:
        self.queue.put((priority, next(self.seq), runner, job))

    def _loop(self) -> None:
        self.ident = threading.get_ident()
        self._ready.set()
        while True:
            _, _, runner, job = self.queue.get()
            try:
                runner._execute(job)
            except BaseException:  # noqa: BLE001 - the thread must survive anything
                traceback.print_exc()
            finally:
                runner = job = None  # drop references to MLX values on this thread


class JobRunner(QObject):
    """A window's front end to the MLX thread; submit jobs from the GUI thread only."""

    job_started = Signal(object)  # Job
    job_finished = Signal(object)  # Job (state done / failed / cancelled)
    job_progress = Signal(object, object, str)  # Job, fraction or None, message

    # worker thread -> GUI thread (queued)
    _w_started = Signal(int)
    _w_done = Signal(int, object, float)
    _w_failed = Signal(int, str, bool, float)
    _w_progress = Signal(int, float, str)  # fraction < 0: unknown (None does not cross threads well)
    _w_event = Signal(int, object)

    def __init__(self, parent: Optional[QObject] = None) -> None:
        super().__init__(parent)
        self._mlx = MlxThread.get()
        self._ids = itertools.count(1)
        self._jobs: dict[int, Job] = {}
        self._closed = False
        self._running: Optional[Job] = None  # set/cleared on the worker thread
        self._idle = threading.Event()
        self._idle.set()
        self._w_started.connect(self._on_started)
        self._w_done.connect(self._on_done)
        self._w_failed.connect(self._on_failed)
        self._w_progress.connect(self._on_progress)
        self._w_event.connect(self._on_event)

    @property
    def thread_id(self) -> Optional[int]:
        """``threading.get_ident()`` of the MLX worker thread."""
        return self._mlx.ident

    # ------------------------------------------------------------------ GUI-thread API
    def submit(self, fn: Callable, *, name: str = "job", priority: int = FOREGROUND,
               on_done=None, on_error=None, on_progress=None, on_event=None) -> Job:
        job = Job(next(self._ids), name, fn, priority, on_done, on_error, on_progress, on_event)
        if self._closed:
            job.state, job.error = "cancelled", "the worker has stopped"
            return job
        self._jobs[job.id] = job
        self._mlx.put(priority, self, job)
        return job

    def active_jobs(self, include_background: bool = True) -> list:
        return [j for j in self._jobs.values() if j.active and (include_background or not j.background)]

    def running_job(self) -> Optional[Job]:
        for j in self._jobs.values():
            if j.state == "running":
                return j
        return None

    def cancel(self, job: Optional[Job]) -> None:
        if job is not None:
            job.cancel()

    def cancel_all(self, include_background: bool = True) -> None:
        for j in list(self._jobs.values()):
            if include_background or not j.background:
                j.cancel()

    def idle(self) -> bool:
        return not self._jobs

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel this runner's jobs and wait (up to ``timeout``) for the one running to stop;
        queued ones are dropped. Idempotent. The MLX thread itself lives on."""
        if self._closed:
            return
        self._closed = True
        for j in list(self._jobs.values()):
            j.cancel()
        self._idle.wait(timeout)
        for j in list(self._jobs.values()):
            if j.active:
                j.state = "cancelled"
        self._jobs.clear()
        for sig in (self._w_started, self._w_done, self._w_failed, self._w_progress, self._w_event):
            try:
                sig.disconnect()
            except (RuntimeError, TypeError):
                pass

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ worker thread
    def _execute(self, job: Job) -> None:
        if self._closed:
            return
        if job.cancel_token.cancelled:
            self._w_failed.emit(job.id, "cancelled", True, 0.0)
            return
        self._idle.clear()
        try:
            if self._closed:
                return
            self._run(job)
        finally:
            self._idle.set()

    def _run(self, job: Job) -> None:
        t0 = time.perf_counter()
        self._w_started.emit(job.id)
        last = [0.0]

        def progress(fraction: Optional[float], message: str, _id=job.id) -> None:
            now = time.perf_counter()
            if now - last[0] < PROGRESS_INTERVAL_S and fraction not in (0.0, 1.0):
                return
            last[0] = now
            self._w_progress.emit(_id, -1.0 if fraction is None else float(fraction), str(message))

        def emit(value: Any, _id=job.id) -> None:
            self._w_event.emit(_id, value)

        try:
            if _arity(job.fn) >= 3:
                result = job.fn(progress, job.cancel_token, emit)
            else:
                result = job.fn(progress, job.cancel_token)
        except Cancelled:
            self._w_failed.emit(job.id, "cancelled", True, time.perf_counter() - t0)
        except BaseException as e:  # noqa: BLE001 - a job must never take the app down
            if not isinstance(e, DupstudioError):
                traceback.print_exc()
            self._w_failed.emit(job.id, error_message(e), False, time.perf_counter() - t0)
        else:
            self._w_done.emit(job.id, result, time.perf_counter() - t0)

    # ------------------------------------------------------------------ GUI-thread slots
    @Slot(int)
    def _on_started(self, job_id: int) -> None:
        job = self._jobs.get(job_id)
        if job is None:
            return
        job.state = "running"
        self.job_started.emit(job)

    @Slot(int, object, float)
    def _on_done(self, job_id: int, result: Any, seconds: float) -> None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        job.state, job.seconds = "done", seconds
        try:
            if job.on_done is not None:
                job.on_done(result)
        finally:
            self.job_finished.emit(job)

    @Slot(int, str, bool, float)
    def _on_failed(self, job_id: int, message: str, cancelled: bool, seconds: float) -> None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        job.state = "cancelled" if cancelled else "failed"
        job.error, job.seconds = message, seconds
        try:
            if job.on_error is not None:
                job.on_error(message)
        finally:
            self.job_finished.emit(job)

    @Slot(int, float, str)
    def _on_progress(self, job_id: int, fraction: float, message: str) -> None:
        job = self._jobs.get(job_id)
        if job is None:
            return
        frac = None if fraction < 0 else fraction
        if job.on_progress is not None:
            job.on_progress(frac, message)
        self.job_progress.emit(job, frac, message)

    @Slot(int, object)
    def _on_event(self, job_id: int, value: Any) -> None:
        job = self._jobs.get(job_id)
        if job is not None and job.on_event is not None:
            job.on_event(value)
