"""The sweep spread over ranks: LPT assignment, journal and reuse in one process, and
``mlx.launch -n 2 --backend ring`` on localhost against one process (tiny model, fast settings)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dupstudio.core.distributed import lpt_assign
from dupstudio.core.testing import free_port_block

LAUNCH = Path(sys.executable).with_name("mlx.launch")


# --------------------------------------------------------------------------- LPT assignment
def test_lpt_assigns_every_job_once_deterministically():
    costs = [30, 30, 30, 30, 550, 1100, 1500, 1500, 35, 35, 120, 300, 1]
    for size in (1, 2, 3, 5):
        a = lpt_assign(costs, size)
        assert len(a) == size
        assert sorted(i for part in a for i in part) == list(range(len(costs)))
        assert all(part == sorted(part) for part in a)  # table order within a rank
        assert a == lpt_assign(list(costs), size)
        loads = [sum(costs[i] for i in part) for part in a]
        # LPT: no rank exceeds another by more than its own smallest job... bounded by max cost
        assert max(loads) - min(loads) <= max(costs)


def test_lpt_known_split_and_ties():
    # longest first: 1500 -> r0, 1500 -> r1, 1100 -> r0 ... ties go to the lowest rank and the
    # earlier job
    assert lpt_assign([1500, 1500, 1100, 550, 30], 2) == [[0, 2], [1, 3, 4]]
    assert lpt_assign([10, 10, 10, 10], 2) == [[0, 2], [1, 3]]
    assert lpt_assign([5], 3) == [[0], [], []]
    assert lpt_assign([], 2) == [[], []]
    # LPT's classic bad case stays within 4/3 of the optimum (here 12 vs 12)
    a = lpt_assign([5, 5, 4, 4, 3, 3], 2)
    assert sorted(sum([5, 5, 4, 4, 3, 3][i] for i in p) for p in a) == [12, 12]


# --------------------------------------------------------------------------- one process
def test_single_rank_journal_equals_sweep_and_is_reused(tiny_loaded, tmp_path, capsys):
    from dupstudio.core.calibrate import settings_from
    from dupstudio.core.distributed import Dist, sweep_distributed
    from dupstudio.core.evaluate import make_windows, tokenize
    from dupstudio.core.search import sweep, sweep_jobs
    from dupstudio.core.testing import tiny_text

    st = settings_from("fast", steps=2, seqs=4, seq_len=32, batch=4)
    toks = tokenize(tiny_loaded.tokenizer, tiny_text())
    cal, ev = make_windows(toks, 32, 4), make_windows(toks, 32, 2)
    jobs = sweep_jobs(tiny_loaded, budgets=[2.6], extra=("k2-serial-channel",), with_search=False,
                      mlx_lm=[("plain", 2, 64)])
    df1, c1 = sweep(tiny_loaded, cal, ev, budget_bpw=[2.6], settings=st, jobs=jobs)
    kw = dict(budgets=[2.6], ctx_kwargs={"settings": st}, partial_csv=tmp_path / "partial.csv")
    for fresh, reused in ((True, 0), (False, len(jobs))):
        df2, c2 = sweep_distributed(Dist(None, 0, 1), tiny_loaded, cal, ev, jobs, fresh=fresh, **kw)
        pd.testing.assert_frame_equal(df1.drop(columns="seconds"), df2.drop(columns="seconds"),
                                      check_exact=False, rtol=1e-6)
        assert list(c2) == list(c1) and df2.attrs["reused_rows"] == reused
        for name, cfg in c1.items():  # replica parameters survive the journal
            a, b = cfg.tensors or {}, c2[name].tensors or {}
            assert sorted(a) == sorted(b)
            for k in a:
                assert np.allclose(np.array(a[k]), np.array(b[k]))
    assert "reusing the journaled row 'full precision'" in capsys.readouterr().err
    part = pd.read_csv(tmp_path / "partial.csv")
    assert list(part["name"]) == list(df1["name"]) and (part["status"] == "done").all()


# --------------------------------------------------------------------------- mlx.launch -n 2


@pytest.fixture(scope="module")
def case(tiny_model_dir, tmp_path_factory):
    if not LAUNCH.exists() and shutil.which("mlx.launch") is None:
        pytest.skip("mlx.launch is not installed beside this Python")
    from dupstudio.core.testing import tiny_text

    d = tmp_path_factory.mktemp("dsweep")
    (d / "text.txt").write_text(tiny_text(), encoding="utf-8")
    return d, tiny_model_dir


def _args(d, model, out, mlx_lm="plain:2:64,dwq:2:64", extra="k2-serial-channel"):
    a = ["-m", "dupstudio", "sweep", str(model), "--budget-bpw", "2.6", "--text-cal", str(d / "text.txt"),
         "--text-eval", str(d / "text.txt"), "--out", str(out), "--windows", "2", "--ctx", "32",
         "--seqs", "4", "--seq-len", "32", "--steps", "2", "--batch", "4", "--no-search",
         "--mlx-lm", mlx_lm]
    return a + (["--extra", extra] if extra else [])


def _env(home):
    return {**os.environ, "DUPSTUDIO_HOME": str(home), "DUPSTUDIO_DIST_TIMEOUT": "30",
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def _launch(args, home, *extra_env, timeout=90):
    launcher = str(LAUNCH) if LAUNCH.exists() else shutil.which("mlx.launch")
    cmd = [launcher, "-n", "2", "--backend", "ring", "-p", str(free_port_block()), "--python", sys.executable]
    for e in extra_env:
        cmd += ["--env", e]
    out = subprocess.run(cmd + ["--", *args], capture_output=True, text=True, timeout=timeout, env=_env(home))
    if "Address already in use" in out.stderr or "Permission denied" in out.stderr:
        pytest.skip(f"mlx.launch cannot open localhost sockets here: {out.stderr[-300:]}")
    return out


def _same_table(a, b):
    assert list(a["name"]) == list(b["name"])
    for col in ("bits_per_weight", "ppl", "ppl_lo", "ppl_hi", "kl", "top1", "latency_ms"):
        assert np.allclose(a[col].to_numpy(float), b[col].to_numpy(float), rtol=1e-5, equal_nan=True), col
    assert list(a["within_budget"]) == list(b["within_budget"])


def _no_seconds(x):
    """Flatten a JSON value to {path: leaf}, without timings."""
    out = {}

    def walk(v, path):
        if isinstance(v, dict):
            for k, w in v.items():
                if k != "seconds":
                    walk(w, f"{path}/{k}")
        elif isinstance(v, list):
            for i, w in enumerate(v):
                walk(w, f"{path}/{i}")
        else:
            out[path] = v
    walk(x, "")
    return out


def test_two_ranks_give_the_one_process_table(case, tmp_path):
    d, model = case
    one = subprocess.run([sys.executable, *_args(d, model, tmp_path / "one")], capture_output=True, text=True,
                         timeout=60, env=_env(tmp_path / "home1"))
    assert one.returncode == 0, one.stderr
    two = _launch(_args(d, model, tmp_path / "two"), tmp_path / "home2")
    assert "[WARN]" not in two.stderr, two.stderr
    assert "rank 0: 1 of 8 jobs" in two.stderr and "rank 1: 7 of 8 jobs" in two.stderr
    assert "[rank 1] " in two.stderr  # the other rank's progress, prefixed
    assert two.stdout.count("full precision") == 1  # only rank 0 prints the table
    a, b = pd.read_csv(tmp_path / "one" / "sweep.csv"), pd.read_csv(tmp_path / "two" / "sweep.csv")
    assert "status" not in b.columns
    _same_table(a, b)
    import json

    ja = json.loads((tmp_path / "one" / "best.json").read_text())
    jb = json.loads((tmp_path / "two" / "best.json").read_text())
    assert ja["provenance"]["sweep"]["chosen"] == jb["provenance"]["sweep"]["chosen"]
    assert jb["provenance"]["sweep"]["ranks"] == 2
    fa, fb = _no_seconds(ja["blocks"]), _no_seconds(jb["blocks"])
    assert sorted(fa) == sorted(fb)
    for k, v in fa.items():
        assert fb[k] == (pytest.approx(v, rel=1e-5) if isinstance(v, float) else v), k
    assert (tmp_path / "two" / "ppl_vs_bpw.png").is_file() and (tmp_path / "two" / "summary.md").is_file()


def test_a_rank_that_dies_is_named_and_finished_rows_are_kept(case, tmp_path):
    d, model = case
    home = tmp_path / "home"
    out = _launch(_args(d, model, tmp_path / "o"), home, "DUPSTUDIO_TEST_DIE_RANK=1")
    err = out.stderr
    assert "Node with rank 1 exited with code 17" in err, err
    assert "rank 0: rank 1 ended" in err, err
    assert "finished rows kept in" in err and "Node with rank 0 exited with code 3" in err, err
    assert "sweep took" not in err
    part = pd.read_csv(tmp_path / "o" / "sweep.csv")
    assert len(part) == 8 and part.iloc[0]["name"] == "full precision"
    # rank 1 journaled its first row (full precision) before dying: it is kept
    assert part.iloc[0]["status"] == "done" and np.isfinite(part.iloc[0]["ppl"])
    miss = part[part["status"] == "missing"]
    assert len(miss) >= 6 and miss["note"].str.contains("rank 1 ended").any()
    assert miss["note"].str.match(r"missing: rank [01] ").all()
    # a rerun with the same arguments reuses the journaled row and completes the table
    again = _launch(_args(d, model, tmp_path / "o"), home)
    assert "[WARN]" not in again.stderr, again.stderr
    assert "rank 1: reusing the journaled row 'full precision'" in again.stderr
    full = pd.read_csv(tmp_path / "o" / "sweep.csv")
    assert "status" not in full.columns and full["ppl"].notna().sum() == 7  # DWQ needs the hub


def test_partial_table_keeps_rank0_rows_when_rank1_dies_later(case, tmp_path):
    d, model = case
    # rank 0: the calibrated K=1 job; rank 1: the rest; rank 1 dies once rank 0 journaled its row
    out = _launch(_args(d, model, tmp_path / "o", mlx_lm="plain:2:64", extra=""), tmp_path / "home",
                  "DUPSTUDIO_TEST_DIE_RANK=1:after-peers")
    err = out.stderr
    assert "Node with rank 1 exited with code 17" in err, err
    assert "rank 0: rank 1 ended" in err, err
    part = pd.read_csv(tmp_path / "o" / "sweep.csv").set_index("name")
    assert part.loc["calibrated K=1 2-bit g64", "status"] == "done"  # rank 0's row
    assert np.isfinite(part.loc["calibrated K=1 2-bit g64", "ppl"])
    assert part.loc["full precision", "status"] == "done"  # rank 1's journaled row
    assert (part.loc[["RTN 2-bit g64", "RTN 3-bit g64", "RTN 4-bit g64"], "status"] == "missing").all()


def test_a_rank_that_hangs_times_out_naming_it(case, tmp_path):
    d, model = case
    args = _args(d, model, tmp_path / "o", mlx_lm="plain:2:64", extra="") + ["--dist-timeout", "3"]
    out = _launch(args, tmp_path / "home", "DUPSTUDIO_TEST_HANG_RANK=1", "DUPSTUDIO_DIST_SLACK=0.5")
    err = out.stderr
    assert "rank 0: rank 1 did not answer within" in err and "finished rows kept in" in err, err
    part = pd.read_csv(tmp_path / "o" / "sweep.csv").set_index("name")
    assert part.loc["calibrated K=1 2-bit g64", "status"] == "done"
    assert part.loc["RTN 2-bit g64", "status"] == "missing"
