"""Evaluation and the sweep spread over several processes under ``mlx.launch``.

The sweep: :func:`sweep_distributed` (jobs split by :func:`lpt_assign`, journaled per rank in the
cache, gathered to rank 0 with :func:`all_gather_bytes`); see its docstring for failures and
timeouts.

Evaluation:

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

import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from dupstudio.core.safeio import pid_alive
from dupstudio.core.jobs import Cancelled, DupstudioError

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
        _stop_guards()
        os._exit(code)


def run_ranked(fn, args) -> int:
    """``fn(args, dist)`` in this process's rank (a single process unless started by
    mlx.launch). Under mlx.launch an error ends the run with ``rank N: ...`` naming this rank."""
    dist = init()
    if dist.size <= 1:
        return fn(args, dist)
    try:
        return fn(args, dist)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - one rank's error ends the run with its rank named
        dist.fail(f"{type(e).__name__}: {' '.join(str(e).split())}", 2)


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
def watchdog(dist: Dist, what: str, timeout_s: float, message: Optional[str] = None):
    """If the body does not finish within ``timeout_s`` (a collective waiting on a dead or
    hung rank), print ``rank N: ...`` (``message`` if given) and end this process (SIGTERM,
    then SIGKILL 2 s later). The timer is a small shell process (the MLX calls it guards may
    hold the GIL, so a Python thread or signal handler could not run). Exceptions raised inside
    also end the rank with a clear message."""
    if dist.size <= 1:
        yield
        return
    import shlex
    import subprocess

    msg = message or (f"rank {dist.rank}: no answer from the other ranks within {timeout_s:.0f}s "
                      f"while {what} (did a rank die or hang? see its messages above)")
    pid = os.getpid()
    guard = subprocess.Popen(
        ["/bin/sh", "-c", f"sleep {max(1.0, timeout_s):.0f}; echo {shlex.quote(msg)} >&2; "
                          f"kill -TERM {pid}; sleep 2; kill -KILL {pid} 2>/dev/null"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    _GUARDS.add(guard)
    try:
        yield
    except DupstudioError:
        raise
    except Exception as e:
        dist.fail(f"{what} failed ({type(e).__name__}: {' '.join(str(e).split())})")
    finally:
        _GUARDS.discard(guard)
        try:
            os.killpg(guard.pid, 9)  # the timer's own process group (sh and its sleep)
        except OSError:
            pass
        guard.wait()


#: running watchdog timers (killed when the rank ends on purpose, so none fires on a reused pid)
_GUARDS: set = set()


def _stop_guards() -> None:
    for g in list(_GUARDS):
        try:
            os.killpg(g.pid, 9)
        except OSError:
            pass


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


# --------------------------------------------------------------------------- distributed sweep
#: ``SweepJob.cost`` is rough seconds on the default model (SmolLM2-135M) on 2 CPU cores
COST_REFERENCE_PARAMS = 135e6
#: the final gather waits the base timeout plus this many times the slowest rank's predicted time
GATHER_SLACK = float(os.environ.get("DUPSTUDIO_DIST_SLACK", "3"))
#: tests: ``N`` makes rank N end (``os._exit(17)``, no message, as a crash would) right after
#: journaling its first computed job; ``N:after-peers`` first waits (30 s at most) until every
#: other rank on this machine journaled a row of this run
DIE_RANK_ENV = "DUPSTUDIO_TEST_DIE_RANK"
#: tests: the rank with this number hangs (sleeps) right after journaling its first computed job
HANG_RANK_ENV = "DUPSTUDIO_TEST_HANG_RANK"


def _test_hooks(run, computed: int) -> None:
    die, hang = os.environ.get(DIE_RANK_ENV), os.environ.get(HANG_RANK_ENV)
    if computed != 1 or not (die or hang):
        return
    if die and int(die.split(":")[0]) == run.dist.rank:
        if die.endswith(":after-peers"):
            t_end = time.monotonic() + 30
            while time.monotonic() < t_end:
                ok = True
                for r in range(run.dist.size):
                    if r == run.dist.rank:
                        continue
                    recs = [run.journal.read(p) for p in sorted((run.journal.run_dir / f"rank{r}").glob("job*.json"))
                            if not p.name.endswith(".cfg.json")]
                    ok &= any(rec and rec.get("run_id") == run.run_id for rec in recs)
                if ok:
                    break
                time.sleep(0.1)
        _stop_guards()
        os._exit(17)
    if hang and int(hang) == run.dist.rank:
        time.sleep(3600)


def lpt_assign(costs, size: int) -> list:
    """Longest processing time first: the jobs in decreasing cost (ties: table order) each go to
    the rank with the least cost assigned so far (ties: the lowest rank). Returns each rank's job
    indices in table order. Deterministic, so every rank computes the same assignment."""
    size = max(1, int(size))
    loads = [0.0] * size
    out = [[] for _ in range(size)]
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        r = min(range(size), key=lambda r: (loads[r], r))
        out[r].append(i)
        loads[r] += float(costs[i])
    return [sorted(o) for o in out]


def job_label(job) -> str:
    """The row name of a job, or a stand-in for an mlx-lm job (named once it has run)."""
    return job.name or f"mlx-lm {job.method}:{job.bits}:{job.group_size}"


def _sha(obj) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def sweep_keys(loaded, cal_tokens, eval_windows, jobs, ctx_kwargs: dict) -> tuple:
    """(portable key, local key). The portable key covers what every rank must agree on (the
    model's shape, the calibration tokens, the evaluation windows, the settings and the job list);
    the local key adds this machine's model path and weight files (size, mtime) and names the
    journal folder."""
    import hashlib
    from dataclasses import asdict, is_dataclass
    from pathlib import Path

    from dupstudio import __version__
    from dupstudio.core.search import _fast

    settings = _fast(ctx_kwargs.get("settings"))
    specs = []
    for j in jobs:
        d = {"name": job_label(j), "kind": j.kind, "calibrate": j.calibrate, "budget_bpw": j.budget_bpw,
             "method": j.method, "bits": j.bits, "group_size": j.group_size}
        if j.cfg is not None:
            d["cfg"] = _sha(j.cfg.to_dict())
        specs.append(d)
    portable = _sha({
        "version": __version__, "model": loaded.config,
        "cal": hashlib.sha256(np.ascontiguousarray(cal_tokens, dtype=np.int64).tobytes()).hexdigest(),
        "cal_shape": list(np.shape(cal_tokens)),
        "eval": hashlib.sha256(np.ascontiguousarray(eval_windows, dtype=np.int64).tobytes()).hexdigest(),
        "eval_shape": list(np.shape(eval_windows)),
        "settings": asdict(settings) if is_dataclass(settings) else repr(settings),
        "ctx": {k: v for k, v in ctx_kwargs.items() if k != "settings"},
        "jobs": specs,
    })
    path = Path(loaded.path).resolve()
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.glob("*.safetensors"))
    return portable, _sha({"portable": portable, "path": str(path), "files": files})


class SweepJournal:
    """Finished rows of a distributed sweep, one JSON per job (plus its configuration through
    :func:`dupstudio.core.config.save`), under ``<dupstudio home>/sweeps/<model>-<key>/rank<r>/``.
    A job's row file is written last, so its presence means the job is complete."""

    def __init__(self, run_dir, rank: int):
        from pathlib import Path

        self.run_dir = Path(run_dir)
        self.rank = rank
        self.dir = self.run_dir / f"rank{rank}"

    @classmethod
    def for_sweep(cls, loaded, local_key: str, rank: int) -> "SweepJournal":
        import re
        from pathlib import Path

        from dupstudio.core.model_io import dupstudio_home

        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(loaded.path)).name)[:40] or "model"
        return cls(dupstudio_home() / "sweeps" / f"{slug}-{local_key[:16]}", rank)

    @staticmethod
    def _stem(idx: int) -> str:
        return f"job{idx:03d}"

    def records(self, idx: int) -> list:
        """Row files of job ``idx``: this rank's first, then the other ranks' folders (a rerun
        with another number of ranks, or on one machine, finds them all)."""
        name = self._stem(idx) + ".json"
        dirs = [self.dir] + sorted(d for d in self.run_dir.glob("rank*") if d != self.dir)
        return [d / name for d in dirs if (d / name).is_file()]

    @staticmethod
    def read(path) -> Optional[dict]:
        import json

        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def load(self, path, shape=None) -> Optional[tuple]:
        """(row, Config or None, config path or None) from a row file, or None if unreadable."""
        from dupstudio.core import config as C

        rec = self.read(path)
        if rec is None or "row" not in rec:
            return None
        cfg = cpath = None
        if rec.get("config"):
            cpath = path.parent / rec["config"]
            try:
                cfg = C.load(cpath, shape)
            except Exception:  # noqa: BLE001 - a damaged record is recomputed
                return None
        return rec["row"], cfg, cpath

    def record(self, idx: int, job, row: dict, cfg, run_id: str):
        """Journal one finished job; returns the configuration's path (or None)."""
        import json
        import time

        from dupstudio.core import config as C

        self.dir.mkdir(parents=True, exist_ok=True)
        cpath = None
        if cfg is not None:
            cpath = self.dir / f"{self._stem(idx)}.cfg.json"
            old = cfg.tensors_file
            C.save(cfg, cpath)
            cfg.tensors_file = old  # the live object keeps pointing where it did
        rec = {"index": idx, "name": row.get("name") or job_label(job), "rank": self.rank, "run_id": run_id,
               "finished": time.time(), "config": cpath.name if cpath else None, "row": row}
        C.atomic_write_bytes(self.dir / f"{self._stem(idx)}.json",
                             (json.dumps(rec, indent=1, default=_json_default) + "\n").encode())
        return cpath


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def all_gather_bytes(dist: Dist, data: bytes, what: str, timeout_s: float = DEFAULT_TIMEOUT_S, *,
                     message: Optional[str] = None, on_error=None) -> list:
    """Every rank's ``data``, in rank order (lengths first, then the bytes padded to the longest,
    as uint8 through ``mx.distributed.all_gather``). ``on_error(text)`` is called (and should not
    return) when the collective raises; else the rank fails with a message."""
    import mlx.core as mx

    data = bytes(data)
    if dist.size <= 1:
        return [data]
    if len(data) >= 2 ** 31:
        raise DupstudioError(f"{what}: {len(data)} bytes is too much for one gather")
    with watchdog(dist, what, timeout_s, message):
        try:
            n = mx.distributed.all_gather(mx.array(np.array([len(data)], dtype=np.int32)), group=dist.group)
            mx.eval(n)
            n = np.array(n).astype(np.int64).reshape(-1)
            buf = np.zeros(max(1, int(n.max())), dtype=np.uint8)
            buf[:len(data)] = np.frombuffer(data, dtype=np.uint8)
            out = mx.distributed.all_gather(mx.array(buf), group=dist.group)
            mx.eval(out)
            out = np.array(out).reshape(dist.size, -1)
        except Exception as e:
            if on_error is not None:
                on_error(f"{what} failed ({type(e).__name__}: {' '.join(str(e).split())})")
            raise
    return [out[r, :int(n[r])].tobytes() for r in range(dist.size)]


class _SweepRun:
    """What a rank knows to end cleanly: its journal, the peers' hosts and pids, its finished rows
    and (rank 0) where the partial table goes."""

    def __init__(self, dist, jobs, assign, journal, budgets, budget_latency_ms, partial_csv):
        import socket

        self.dist, self.jobs, self.assign, self.journal = dist, jobs, assign, journal
        self.budgets, self.budget_latency_ms, self.partial_csv = budgets, budget_latency_ms, partial_csv
        self.rows = {}  # job index -> row, this rank's (computed or reused)
        self.peers = None  # [{host, pid, journal}] once exchanged
        self.run_id = ""
        self.fresh = False
        self.host = socket.gethostname()

    def owner(self, idx: int) -> int:
        return next(r for r, a in enumerate(self.assign) if idx in a)

    def gone(self, wait_s: float = 0.0) -> list:
        """Other ranks on this machine whose process has ended (polls up to ``wait_s``)."""
        if not self.peers:
            return []
        t_end = time.monotonic() + wait_s
        while True:
            out = [r for r, p in enumerate(self.peers)
                   if r != self.dist.rank and p.get("host") == self.host and not pid_alive(int(p["pid"]))]
            if out or time.monotonic() >= t_end:
                return out
            time.sleep(0.1)

    def others(self) -> str:
        rs = [r for r in range(self.dist.size) if r != self.dist.rank]
        return ("rank " if len(rs) == 1 else "ranks ") + ", ".join(map(str, rs))

    def partial_frame(self, gone=()):
        """All jobs in table order: this rank's rows, rows journaled by any rank in this run's
        local folder, and the missing ones named with their rank (``status`` column)."""
        import pandas as pd

        from dupstudio.core.search import mark_budgets

        rows = []
        for i, job in enumerate(self.jobs):
            row = self.rows.get(i)
            if row is None:
                for p in self.journal.records(i):
                    rec = self.journal.read(p)
                    if rec and "row" in rec and (not self.fresh or rec.get("run_id") == self.run_id):
                        row = rec["row"]
                        break
            if row is not None:
                rows.append({**row, "status": "done"})
                continue
            r = self.owner(i)
            why = f"rank {r} ended" if r in gone else f"rank {r} had not finished it"
            rows.append({"name": job_label(job), "source": "mlx-lm" if job.kind == "mlx-lm" else
                         ("fp" if job.kind == "fp" else "dupstudio"), "bits_per_weight": math.nan,
                         "embedding_bits": None, "ppl": math.nan, "ppl_lo": math.nan, "ppl_hi": math.nan,
                         "kl": math.nan, "top1": math.nan, "latency_ms": math.nan,
                         "note": f"missing: {why}", "seconds": math.nan, "status": "missing"})
        return mark_budgets(pd.DataFrame(rows), self.budgets, self.budget_latency_ms)

    def write_partial(self, gone=()) -> Optional[str]:
        if not self.dist.is_root or self.partial_csv is None:
            return None
        from dupstudio.core import config as C

        try:
            df = self.partial_frame(gone)
            if not (df["status"] == "done").any():
                return None  # nothing to keep: leave an earlier sweep.csv alone
            C.atomic_write_bytes(self.partial_csv, df.to_csv(index=False).encode())
            return str(self.partial_csv)
        except Exception as e:  # noqa: BLE001 - the message still goes out
            print(f"rank {self.dist.rank}: could not write the partial table ({e})", file=sys.stderr)
            return None

    def fail(self, what: str, code: int = EXIT_RANK_FAILED, gone=()):
        part = self.write_partial(gone)
        tail = f"; finished rows kept in {self.journal.run_dir}"
        if part:
            tail += f"; partial table (missing rows marked) in {part}"
        self.dist.fail(what + tail, code)

    def peer_failed(self, what: str):
        """A collective raised: name the rank(s) gone if this machine can see them."""
        gone = self.gone(wait_s=2.0)
        who = (", ".join(f"rank {r}" for r in gone) + " ended" if gone
               else f"{self.others()} did not answer")
        self.fail(f"{who} before the sweep results were gathered ({what})", gone=gone)

    def on_sigterm(self, signum, frame):  # pragma: no cover - exercised through mlx.launch
        # mlx.launch sends SIGTERM only (no SIGKILL after it), so there is time to look for the
        # rank that ended: on a loaded machine it can take a second or two to be seen as gone
        gone = self.gone(wait_s=2.0)
        if gone:
            who = ", ".join(f"rank {r}" for r in gone) + " ended before the sweep finished"
        else:
            who = ("stopped from outside (mlx.launch stops every rank once one ends: its "
                   "'[WARN] Node with rank N' line names it; or the watchdog message above)")
        self.fail(who, gone=gone)


def sweep_distributed(dist: Dist, loaded, cal_tokens, eval_windows, jobs: list, *, budgets,
                      ctx_kwargs: Optional[dict] = None, progress=None, cancel=None,
                      partial_csv=None, timeout_s: Optional[float] = None, fresh: bool = False,
                      log=None):
    """The sweep of :func:`dupstudio.core.search.sweep` spread over the ranks of ``dist``.

    Jobs go to ranks by longest-processing-time-first on ``job.cost`` (:func:`lpt_assign`); each
    rank runs its jobs with :func:`~dupstudio.core.search.run_job` and journals every finished row
    (and its configuration) under ``<dupstudio home>/sweeps/<model>-<key>/rank<r>/`` at once; a
    rerun with the same model, texts, settings and jobs reuses journaled rows (``fresh`` ignores
    them). The rows and configurations are then gathered to every rank; rank 0 returns
    ``(DataFrame, {name: Config})`` in the table order of the one-process sweep, the others
    ``(None, None)``.

    Failures: a job that raises, a rank that dies (``mlx.launch`` then sends SIGTERM to the
    others) or a gather that gets no answer in time ends each surviving rank with ``rank N: ...``
    naming the rank that ended when it ran on the same machine, the journal folder, and (rank 0)
    ``partial_csv`` rewritten with every row it has (its own and those journaled on this machine)
    and the missing ones marked (``status`` column). Rank 0 also rewrites ``partial_csv`` after each
    of its jobs, so a table exists even if it is killed outright.

    Timeouts: ranks compute their shares without talking, so nothing can time out during a long
    calibration. The first exchange (keys, hosts, pids) waits ``timeout_s`` (default
    ``DUPSTUDIO_DIST_TIMEOUT``, 300 s); the final gather waits ``timeout_s`` plus
    ``GATHER_SLACK`` (3, ``DUPSTUDIO_DIST_SLACK``) times the slowest rank's predicted time: its
    summed ``job.cost`` times max(this rank's measured seconds per cost unit, model parameters /
    135M). A dead rank is noticed at once through ``mlx.launch``; the timeout only catches ranks
    that hang."""
    import io
    import json
    import signal
    import tempfile
    import uuid
    import zipfile
    from pathlib import Path

    import pandas as pd

    from dupstudio.core import config as C
    from dupstudio.core.jobs import ensure
    from dupstudio.core.search import SweepContext, mark_budgets, run_job

    progress, cancel = ensure(progress, cancel)
    log = log or (lambda msg: print(f"rank {dist.rank}: {msg}", file=sys.stderr, flush=True))
    ctx_kwargs = dict(ctx_kwargs or {})
    budgets = [float(budgets)] if isinstance(budgets, (int, float)) else [float(b) for b in budgets]
    base_timeout = float(timeout_s) if timeout_s is not None else DEFAULT_TIMEOUT_S
    portable, local = sweep_keys(loaded, cal_tokens, eval_windows, jobs, ctx_kwargs)
    journal = SweepJournal.for_sweep(loaded, local, dist.rank)
    assign = lpt_assign([j.cost for j in jobs], dist.size)
    run = _SweepRun(dist, jobs, assign, journal, budgets, ctx_kwargs.get("budget_latency_ms"),
                    Path(partial_csv) if partial_csv is not None else None)
    run.fresh = fresh
    old_term = None
    if dist.size > 1:
        old_term = signal.signal(signal.SIGTERM, run.on_sigterm)
    try:
        # 1. agree on the sweep; learn each rank's host, pid and journal
        me = {"key": portable, "host": run.host, "pid": os.getpid(), "journal": str(journal.run_dir),
              "run_id": uuid.uuid4().hex}
        got = all_gather_bytes(dist, json.dumps(me).encode(), "agreeing on the sweep", base_timeout,
                               on_error=run.peer_failed)
        run.peers = [json.loads(b) for b in got]
        run.run_id = run.peers[0]["run_id"]
        differ = [r for r, p in enumerate(run.peers) if p["key"] != run.peers[0]["key"]]
        if differ:
            dist.fail(f"rank(s) {', '.join(map(str, differ))} prepared another sweep than rank 0 (model, "
                      f"texts, settings or job list differ): run every rank with the same arguments", 2)
        mine = assign[dist.rank]
        if dist.size > 1:
            log(f"{len(mine)} of {len(jobs)} jobs: " + ", ".join(job_label(jobs[i]) for i in mine))

        # 2. this rank's jobs, journaled as they finish
        ctx = SweepContext(loaded, cal_tokens, eval_windows, **ctx_kwargs)
        shape = ctx.shape
        results = {}  # idx -> (row, cfg, cfg path)
        total = sum(jobs[i].cost for i in mine) or 1.0
        done = spent_cost = spent_s = 0.0
        computed = 0
        for i in mine:
            cancel.check()
            job = jobs[i]
            hit = None
            if not fresh:
                for p in journal.records(i):
                    hit = journal.load(p, shape)
                    if hit is not None:
                        log(f"reusing the journaled row {hit[0].get('name')!r} ({p}); --fresh recomputes")
                        break
            if hit is None:
                lo, hi = done / total, (done + job.cost) / total
                label = job_label(job)

                def sub(frac, msg, lo=lo, hi=hi, label=label):
                    progress(lo + (hi - lo) * (frac or 0.0), f"{label}: {msg}")

                t0 = time.perf_counter()
                try:
                    row, cfg = run_job(ctx, job, progress=sub, cancel=cancel)
                except Cancelled:
                    raise
                except Exception as e:
                    if dist.size <= 1:
                        raise
                    run.fail(f"job {label!r} failed ({type(e).__name__}: {' '.join(str(e).split())})", 2)
                spent_s += time.perf_counter() - t0
                spent_cost += job.cost
                cpath = journal.record(i, job, row, cfg, run.run_id)
                hit = (row, cfg, cpath)
                computed += 1
                _test_hooks(run, computed)
            results[i] = hit
            run.rows[i] = hit[0]
            done += job.cost
            progress(done / total, f"{hit[0].get('name') or job_label(job)} done")
            run.write_partial()
        if dist.size > 1:
            log(f"my {len(mine)} jobs are done ({computed} computed); waiting for the others")
            run.write_partial()

        # 3. gather rows and configurations
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            meta = {"rank": dist.rank, "rows": {}, "configs": {}, "cache_hits": ctx.cache.hits,
                    "computed": computed}
            for i, (row, cfg, cpath) in results.items():
                meta["rows"][str(i)] = row
                if cpath is not None:
                    arc = f"cfg{i:03d}.json"
                    z.write(cpath, arc)
                    side = json.loads(Path(cpath).read_text(encoding="utf-8")).get("tensors") or {}
                    if side.get("file"):
                        z.write(Path(cpath).parent / side["file"], side["file"])
                    meta["configs"][str(i)] = arc
            z.writestr("rows.json", json.dumps(meta, default=_json_default))
        loads = [sum(jobs[i].cost for i in a) for a in assign]
        scale = max(spent_s / spent_cost if spent_cost else 0.0, _params(loaded) / COST_REFERENCE_PARAMS)
        t_gather = base_timeout + GATHER_SLACK * scale * max(loads)
        msg = (f"rank {dist.rank}: {run.others()} did not answer within {t_gather:.0f}s while gathering "
               f"the sweep results (died or hangs?); finished rows kept in {journal.run_dir}")
        blobs = all_gather_bytes(dist, buf.getvalue(), "gathering the sweep results", t_gather,
                                 message=msg, on_error=run.peer_failed)
        if not dist.is_root:
            return None, None

        # 4. rank 0: the table in job order
        rows, cfgs, hits, reused = {}, {}, 0, 0
        with tempfile.TemporaryDirectory(prefix="dupstudio-gather-") as td:
            for r, blob in enumerate(blobs):
                if r == dist.rank:
                    for i, (row, cfg, _) in results.items():
                        rows[i] = row
                        if cfg is not None:
                            cfgs[i] = cfg
                    hits += ctx.cache.hits
                    reused += len(results) - computed
                    continue
                d = Path(td) / f"rank{r}"
                with zipfile.ZipFile(io.BytesIO(blob)) as z:
                    z.extractall(d)
                meta = json.loads((d / "rows.json").read_text(encoding="utf-8"))
                hits += int(meta.get("cache_hits", 0))
                reused += len(meta["rows"]) - int(meta.get("computed", 0))
                for k, row in meta["rows"].items():
                    rows[int(k)] = row
                for k, arc in meta["configs"].items():
                    cfgs[int(k)] = C.load(d / arc, shape)
        missing = [i for i in range(len(jobs)) if i not in rows]
        if missing:
            run.fail("the gathered results lack " + ", ".join(job_label(jobs[i]) for i in missing))
        df = mark_budgets(pd.DataFrame([rows[i] for i in range(len(jobs))]), budgets,
                          ctx_kwargs.get("budget_latency_ms"))
        df.attrs["calibration_cache_hits"] = hits
        df.attrs["ranks"] = dist.size
        df.attrs["reused_rows"] = reused
        df.attrs["journal"] = str(journal.run_dir)
        return df, {rows[i]["name"]: cfgs[i] for i in sorted(cfgs)}
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _params(loaded) -> float:
    try:
        from mlx.utils import tree_flatten

        return float(sum(v.size for _, v in tree_flatten(loaded.model.parameters())))
    except Exception:  # noqa: BLE001
        return 0.0
