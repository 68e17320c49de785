"""Issue 22, "nothing lost, nothing hangs": the CLI refuses nonsense at its boundary with a
one-line error and exit 2, and never loses the user's files."""
import json
import os
import stat
from pathlib import Path

import pytest

from dupstudio.cli import main
from dupstudio.core import config as C
from dupstudio.core.model_io import model_shape
from dupstudio.core.testing import tiny_text


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("dupstudio: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dir, tiny_loaded):
    d = tmp_path_factory.mktemp("robust")
    (d / "text.txt").write_text(tiny_text(20000))
    cfg = C.new_config(model_shape(tiny_loaded.config), source=str(tiny_model_dir), replicas=2)
    C.save(cfg, d / "cfg.json")
    return d


@pytest.mark.parametrize("extra, words", [
    (["--batch", "-1"], "--batch must be at least 1 (got -1): the number of windows evaluated together"),
    (["--batch", "0"], "--batch must be at least 1 (got 0)"),
    (["--windows", "0"], "--windows must be at least 1 (got 0): the number of evaluation windows"),
    (["--ctx", "1"], "--ctx must be at least 2 (got 1)"),
    (["--ctx", "100000"], "--ctx 100000 is longer than the model's context of 2048 tokens"),
    (["--dist-timeout", "nan"], "--dist-timeout must be a finite number"),
])
def test_eval_refuses_bad_numbers(capsys, work, tiny_model_dir, extra, words):
    for config in (["--model", tiny_model_dir], [work / "cfg.json"]):  # full precision; with KL
        code, out, err = run_cli(capsys, "eval", *config, "--text", work / "text.txt", *extra)
        assert code == 2 and out == ""
        assert words in one_error(err)


@pytest.mark.parametrize("argv, words", [
    (["--temp", "nan"], "--temp must be a finite number (got nan)"),
    (["--top-p", "nan"], "--top-p must be a finite number"),
])
def test_generate_refuses_nan(capsys, tiny_model_dir, argv, words):
    code, _, err = run_cli(capsys, "generate", tiny_model_dir, "-p", "x", *argv)
    assert code == 2 and words in one_error(err)


@pytest.mark.parametrize("argv, words", [
    (["--replicas", "-1"], "replicas: K must be 1-4, got the number -1"),
    (["--replicas", "2", "--layers", "5-2"], "'5-2' is an empty range"),
    (["--strategy-arg", "colour=red"], "defaults.strategy_args: unknown argument 'colour'"),
    (["--strategy", "percentile", "--strategy-arg", "p=30"], r"strategy_args.p: expected a number in (50, 100]"),
    (["--embedding-bits", "5"], "embedding.bits: expected one of 2, 3, 4, 8"),
])
def test_config_new_refuses_nonsense(capsys, tmp_path, tiny_model_dir, argv, words):
    code, _, err = run_cli(capsys, "config", "new", tiny_model_dir, *argv, "--out", tmp_path / "c.json")
    assert code == 2 and words in one_error(err)
    assert not (tmp_path / "c.json").exists()


def test_unwritable_outputs_are_one_line(capsys, tmp_path, tiny_model_dir):
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(capsys, "config", "new", tiny_model_dir, "--out", "/proc/c.json")
    assert code == 2 and "/proc/c.json: cannot write" in one_error(err)
    code, _, err = run_cli(capsys, "config", "new", tiny_model_dir, "--out", tmp_path / "file" / "c.json")
    assert code == 2 and "is a file, not a folder" in one_error(err)


def test_eval_save_keeps_the_file_mode(capsys, work):
    p = work / "mode.json"
    p.write_text((work / "cfg.json").read_text())
    os.chmod(p, 0o644)
    code, _, err = run_cli(capsys, "eval", p, "--text", work / "text.txt", "--windows", "2",
                           "--ctx", "64", "--no-kl", "--save")
    assert code == 0, err
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert json.loads(p.read_text())["results"]


def test_export_overwrite_never_deletes_the_input(capsys, work, tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    cfg = out / "cfg.json"
    cfg.write_text((work / "cfg.json").read_text())
    (out / "mine.txt").write_text("keep")
    code, _, err = run_cli(capsys, "export", cfg, "--out", out, "--overwrite")
    assert code == 2 and "not a dupstudio export" in one_error(err)
    assert sorted(os.listdir(out)) == ["cfg.json", "mine.txt"]
    code, _, err = run_cli(capsys, "export", work / "cfg.json", "--out", tmp_path / "e2", "--dtype", "float32")
    assert code == 0, err
    (Path(tmp_path / "e2") / "mine.txt").write_text("keep")
    code, _, err = run_cli(capsys, "export", work / "cfg.json", "--out", tmp_path / "e2", "--overwrite",
                           "--dtype", "float32")
    assert code == 0, err
    assert (tmp_path / "e2" / "mine.txt").read_text() == "keep"
