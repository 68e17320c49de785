"""Killed at a random moment (SIGKILL: no handler runs), calibrate, export and the GGUF conversion
leave nothing half-written where a user would look, and the rerun succeeds.

Each trial starts the real CLI in a child process, kills it after a random delay drawn over the
command's own running time, then checks the visible outputs and runs the command again."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dupstudio.core import config as C
from dupstudio.core.model_io import model_shape
from dupstudio.core.testing import tiny_text, write_tiny_gguf

TRIALS = 3


def _cli(args, home, timeout=300):
    env = dict(os.environ, DUPSTUDIO_HOME=str(home), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "dupstudio", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _run_then_kill(args, home, delay):
    p = _cli(args, home)
    time.sleep(delay)
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    return p.returncode


def _finish(args, home):
    p = _cli(args, home)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    return err


def _visible(folder: Path) -> set:
    return {x.name for x in folder.iterdir() if not x.name.startswith(".")}


def _full_time(args, home) -> float:
    t = time.perf_counter()
    _finish(args, home)
    return time.perf_counter() - t


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tiny_loaded, tmp_path_factory):
    d = tmp_path_factory.mktemp("kill")
    cfg = C.new_config(model_shape(tiny_loaded.config), source=str(tiny_model_dir))
    C.save(cfg, d / "cfg.json")
    (d / "t.txt").write_text(tiny_text(20000))
    return d


def test_killed_calibration_leaves_no_output_and_resumes(inputs, tmp_path):
    rng = random.Random(0)
    args = ["calibrate", inputs / "cfg.json", "--text", inputs / "t.txt", "--seqs", "6", "--seq-len", "32",
            "--steps", "30", "--batch", "4", "--no-stream"]
    full = _full_time([*args, "--out", tmp_path / "ref.json"], tmp_path / "home")
    killed = 0
    for trial in range(TRIALS):
        out = tmp_path / f"t{trial}" / "cal.json"
        out.parent.mkdir()
        killed += _run_then_kill([*args, "--out", out], tmp_path / "home", rng.uniform(0.3, 1.0) * full) == -9
        # the output exists only complete (it is written last, atomically)
        assert _visible(out.parent) <= {"cal.json", "cal.json.partial"} | {
            x.name for x in out.parent.glob("cal.*.safetensors")}
        if out.exists():
            C.load(out)
        _finish([*args, "--out", out], tmp_path / "home")  # the rerun resumes or starts afresh
        d = json.loads(out.read_text())
        assert all(b["calibration"] for b in d["blocks"])
        assert not (out.parent / "cal.json.partial").exists()
    assert killed >= 1  # the trials did interrupt the command (not only let it finish)


def test_killed_export_never_leaves_a_half_folder(inputs, tmp_path):
    rng = random.Random(1)
    full = _full_time(["export", inputs / "cfg.json", "--out", tmp_path / "ref"], tmp_path / "home")
    killed = 0
    for trial in range(TRIALS):
        dest = tmp_path / f"t{trial}" / "model"
        dest.parent.mkdir()
        killed += _run_then_kill(["export", inputs / "cfg.json", "--out", dest], tmp_path / "home",
                                 rng.uniform(0.3, 1.0) * full) == -9
        # either no folder or a complete one (it is renamed into place when finished)
        assert _visible(dest.parent) <= {"model"}
        if dest.exists():
            assert (dest / "dupstudio-export.json").exists() and (dest / "config.json").exists()
        _finish(["export", inputs / "cfg.json", "--out", dest, "--overwrite"], tmp_path / "home")
        assert (dest / "model.safetensors").exists() or list(dest.glob("model*.safetensors"))
    assert killed >= 1


def test_killed_gguf_conversion_is_redone_and_never_used_half(tmp_path):
    from dupstudio.core import gguf

    rng = random.Random(2)
    src = write_tiny_gguf(tmp_path / "tiny.gguf", layers=4, hidden=128)
    full = _full_time(["info", src], tmp_path / "ref-home")
    killed = 0
    for trial in range(TRIALS):
        home = tmp_path / f"home{trial}"
        killed += _run_then_kill(["info", src], home, rng.uniform(0.2, 1.0) * full) == -9
        models = home / "models"
        if models.exists():
            for d in _visible(models):
                assert gguf.is_complete_conversion(models / d), d  # only finished ones are visible
        _finish(["info", src], home)
        done = [models / d for d in _visible(models)]
        assert len(done) == 1 and gguf.is_complete_conversion(done[0])
    assert killed >= 1
