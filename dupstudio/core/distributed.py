"""Evaluation spread over several processes under ``mlx.launch`` (issue 11).

Each rank evaluates a contiguous chunk of the windows; the per-window NLL sums (placed into a
zero-filled array of all windows), the KL sum, the agreement count and the token count are
combined with ``mx.distributed.all_sum``. Every rank then holds the same :class:`EvalResult`
(bootstrap interval included); only rank 0 prints or writes.

Run on one machine (ring backend over TCP on localhost)::

    mlx.launch -n 2 --backend ring --python .venv/bin/python -- \\
        -m dupstudio eval cfg.json --text t.txt --windows 16 --ctx 512

Failures: if joining the group fails, or a collective raises, or a collective gets no answer
within a timeout (a rank died or hangs), the rank prints ``rank N: ...`` on stderr and exits
non-zero; ``mlx.launch`` then stops the other ranks. (Note: ``mlx.launch`` itself exits 0 even
when a rank failed; read the ``rank N:`` lines and its ``[WARN] Node with rank N`` lines.)
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from dupstudio.core.jobs import DupstudioError

#: exit status of a rank that gives up (init failure, collective error or timeout)
EXIT_RANK_FAILED = 3
#: seconds a rank waits in a collective beyond its own compute time before giving up
DEFAULT_TIMEOUT_S = float(os.environ.get("DUPSTUDIO_DIST_TIMEOUT", "300"))


#: seconds a rank waits for its peers to answer when joining the group
INIT_TIMEOUT_S = float(os.environ.get("DUPSTUDIO_DIST_INIT_TIMEOUT", "120"))


def launched() -> bool:
    """True when this process was started by ``mlx.launch`` (or another MLX launcher)."""
    return any(k in os.environ for k in ("MLX_RANK", "MLX_HOSTFILE", "OMPI_COMM_WORLD_RANK",
                                         "MLX_WORLD_SIZE"))


@dataclass
class Dist:
    group: Any  # mx.distributed.Group or None (single process)
    rank: int = 0
    size: int = 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def fail(self, what: str, code: int = EXIT_RANK_FAILED):
        """Print ``rank N: what`` and end this process at once (no cleanup that could hang on
        a dead peer)."""
        print(f"rank {self.rank}: {what}", file=sys.stderr, flush=True)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(code)


def init(backend: str = "any", *, force: bool = False) -> Dist:
    """Join the distributed group if launched by ``mlx.launch``; else a single process.

    A launched rank that cannot join prints ``rank N: ...`` and exits non-zero."""
    import mlx.core as mx

    env_rank = os.environ.get("MLX_RANK", "?")
    if not (force or launched()):
        return Dist(None, 0, 1)
    me = Dist(None, env_rank, 2)
    try:
        with watchdog(me, "joining the distributed group", INIT_TIMEOUT_S):
            g = mx.distributed.init(strict=True, backend=backend)
    except Exception as e:  # pragma: no cover - watchdog turns errors into exits
        me.fail(f"could not join the distributed group ({type(e).__name__}: {e})")
    return Dist(g, g.rank(), g.size())


def shard(n: int, rank: int, size: int) -> np.ndarray:
    """Indices of the windows rank ``rank`` of ``size`` evaluates: contiguous chunks whose
    lengths differ by at most one (some ranks get none when n < size)."""
    return np.array_split(np.arange(n), size)[rank]


@contextmanager
def watchdog(dist: Dist, what: str, timeout_s: float):
    """If the body does not finish within ``timeout_s`` (a collective waiting on a dead or
    hung rank), print ``rank N: ...`` and end this process. The timer is a small shell process
    (the MLX calls it guards may hold the GIL, so a Python thread or signal handler could not
    run). Exceptions raised inside also end the rank with a clear message."""
    if dist.size <= 1:
        yield
        return
    import shlex
    import subprocess

    msg = (f"rank {dist.rank}: no answer from the other ranks within {timeout_s:.0f}s while "
           f"{what} (did a rank die or hang? see its messages above)")
    pid = os.getpid()
    guard = subprocess.Popen(
        ["/bin/sh", "-c", f"sleep {max(1.0, timeout_s):.0f}; echo {shlex.quote(msg)} >&2; "
                          f"kill -TERM {pid}; sleep 2; kill -KILL {pid} 2>/dev/null"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        yield
    except DupstudioError:
        raise
    except Exception as e:
        dist.fail(f"{what} failed ({type(e).__name__}: {' '.join(str(e).split())})")
    finally:
        try:
            os.killpg(guard.pid, 9)  # the timer's own process group (sh and its sleep)
        except OSError:
            pass
        guard.wait()


def all_sum(dist: Dist, x: np.ndarray, what: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> np.ndarray:
    """Element-wise sum over ranks of a float array (float32 on the wire: float64 is not
    supported by every backend; values are split into high and low float32 parts so the sum
    keeps ~1e-14 relative precision)."""
    import mlx.core as mx

    x = np.asarray(x, dtype=np.float64)
    if dist.size <= 1:
        return x
    hi = x.astype(np.float32)
    lo = (x - hi.astype(np.float64)).astype(np.float32)
    with watchdog(dist, what, timeout_s):
        out = mx.distributed.all_sum(mx.array(np.stack([hi, lo])), group=dist.group)
        mx.eval(out)
        out = np.array(out).astype(np.float64)
    return out[0] + out[1]


def barrier(dist: Dist, what: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """All ranks reach this point (each checks that every rank arrived)."""
    if dist.size <= 1:
        return
    n = all_sum(dist, np.ones(1), what, timeout_s)
    if int(round(n[0])) != dist.size:
        dist.fail(f"{what}: {int(round(n[0]))} of {dist.size} ranks answered")


def evaluate_distributed(model, windows: np.ndarray, dist: Dist, *, reference=None,
                         batch_size: int = 4, progress=None, cancel=None, seed: int = 0,
                         evaluate_fn=None, timeout_s: Optional[float] = None):
    """:func:`dupstudio.core.evaluate.evaluate` over this rank's share of ``windows``, combined
    over all ranks. Every rank returns the same result (equal to one process to float
    tolerance). ``evaluate_fn(model, windows, reference=..., ...)`` replaces the in-memory
    evaluation (e.g. the streamed one)."""
    from dupstudio.core.evaluate import EvalResult, bootstrap_ppl, evaluate

    evaluate_fn = evaluate_fn or evaluate
    t0 = time.perf_counter()
    n, ctx = windows.shape
    if dist.size <= 1:
        return evaluate_fn(model, windows, reference=reference, batch_size=batch_size,
                           progress=progress, cancel=cancel, seed=seed)
    idx = shard(n, dist.rank, dist.size)
    sums = np.zeros(n)
    kl_sum = agree = count = 0.0
    if len(idx):
        r = evaluate_fn(model, windows[idx], reference=reference, batch_size=batch_size,
                        progress=progress, cancel=cancel, seed=seed)
        sums[idx] = np.asarray(r.window_nll) * (ctx - 1)
        count = float(len(idx) * (ctx - 1))
        if reference is not None:
            kl_sum, agree = r.kl * count, r.top1_agreement * count
    own = time.perf_counter() - t0
    timeout = timeout_s if timeout_s is not None else max(DEFAULT_TIMEOUT_S, 3 * own + 60)
    fail_rank = os.environ.get("DUPSTUDIO_DIST_FAIL_RANK")  # tests: simulate a dying rank
    if fail_rank is not None and int(fail_rank) == dist.rank:
        dist.fail("simulated failure (DUPSTUDIO_DIST_FAIL_RANK)")
    tot = all_sum(dist, np.concatenate([sums, [kl_sum, agree, count, 1.0]]),
                  "combining the evaluation results", timeout)
    sums, (kl_sum, agree, count, ranks) = tot[:n], tot[n:]
    if int(round(ranks)) != dist.size:
        dist.fail(f"only {int(round(ranks))} of {dist.size} ranks contributed results")
    toks = np.full(n, ctx - 1)
    mean = float(sums.sum() / toks.sum())
    return EvalResult(
        ppl=float(np.exp(mean)), nll=mean, tokens=int(toks.sum()), windows=n, ctx=ctx,
        ppl_ci95=bootstrap_ppl(sums, toks, seed=seed), window_nll=(sums / toks).tolist(),
        kl=(kl_sum / count) if reference is not None else None,
        top1_agreement=(agree / count) if reference is not None else None,
        seconds=time.perf_counter() - t0,
    )
