"""Distributed evaluation under ``mlx.launch`` (ring backend over TCP on localhost)."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dupstudio.core.testing import free_port_block

from dupstudio.core.distributed import shard

LAUNCH = Path(sys.executable).with_name("mlx.launch")


def test_shards_cover_every_window_once():
    for n in (1, 5, 16):
        for size in (1, 2, 3):
            parts = [shard(n, r, size) for r in range(size)]
            assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1




@pytest.fixture(scope="module")
def eval_case(tiny_model_dir, tmp_path_factory):
    if not LAUNCH.exists() and shutil.which("mlx.launch") is None:
        pytest.skip("mlx.launch is not installed beside this Python")
    from dupstudio.core import config as C
    from dupstudio.core.model_io import model_shape, open_model
    from dupstudio.core.testing import tiny_text

    d = tmp_path_factory.mktemp("dist")
    loaded = open_model(tiny_model_dir, lazy=True)
    cfg = C.new_config(model_shape(loaded.config), source=str(tiny_model_dir), replicas=2,
                       layers=[1], init="gamma")
    C.save(cfg, d / "cfg.json")
    (d / "text.txt").write_text(tiny_text(20000))
    return d


def _eval_args(d):
    return ["-m", "dupstudio", "eval", str(d / "cfg.json"), "--text", str(d / "text.txt"),
            "--windows", "5", "--ctx", "64", "--json"]


def _launch(d, *extra_env, n=2, timeout=60):
    launcher = str(LAUNCH) if LAUNCH.exists() else shutil.which("mlx.launch")
    cmd = [launcher, "-n", str(n), "--backend", "ring", "-p", str(free_port_block()),
           "--python", sys.executable]
    for e in extra_env:
        cmd += ["--env", e]
    cmd += ["--", *_eval_args(d)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "DUPSTUDIO_DIST_TIMEOUT": "30"})


def test_two_ranks_equal_one_process(eval_case):
    one = subprocess.run([sys.executable, *_eval_args(eval_case)], capture_output=True, text=True,
                         timeout=60)
    assert one.returncode == 0, one.stderr
    r1 = json.loads(one.stdout)
    two = _launch(eval_case)
    if "Address already in use" in two.stderr or "Permission denied" in two.stderr:
        pytest.skip(f"mlx.launch cannot open localhost sockets here: {two.stderr[-300:]}")
    assert "[WARN]" not in two.stderr, two.stderr
    r2 = json.loads(two.stdout)  # only rank 0 prints: exactly one JSON document
    assert r2["provenance"]["ranks"] == 2
    # Each rank batches only its own windows, so the logits come from matmuls of other shapes
    # than one process's (equal to float32 rounding, not bit for bit), and the sums are added
    # in another order; ppl and KL carry that rounding far below these tolerances. A position
    # whose two largest logits lie within rounding of each other may flip its top-1: one.
    assert r2["ppl"] == pytest.approx(r1["ppl"], rel=1e-5)
    assert r2["kl"] == pytest.approx(r1["kl"], rel=1e-4)
    assert r2["top1_agreement"] == pytest.approx(r1["top1_agreement"], abs=1 / r1["tokens"] + 1e-12)
    assert r2["ppl_ci95"] == pytest.approx(r1["ppl_ci95"], rel=1e-5)
    assert r2["tokens"] == r1["tokens"]


def test_a_dying_rank_is_named_and_no_result_is_printed(eval_case):
    out = _launch(eval_case, "DUPSTUDIO_DIST_FAIL_RANK=1")
    assert "rank 1: simulated failure" in out.stderr
    assert '"ppl"' not in out.stdout


def test_unreachable_peer_times_out_with_the_rank_named(eval_case, tmp_path):
    host = tmp_path / "hosts.json"
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    env = {**os.environ, "MLX_RANK": "0", "MLX_HOSTFILE": str(host),
           "DUPSTUDIO_DIST_INIT_TIMEOUT": "2"}
    out = subprocess.run([sys.executable, *_eval_args(eval_case)], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode != 0
    assert "rank 0:" in out.stderr and "joining the distributed group" in out.stderr
