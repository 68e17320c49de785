"""The command line, run in-process through ``dupstudio.cli.main`` (and a few subprocesses for
the entry points)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dupstudio
from dupstudio.cli import main

REPO = Path(__file__).resolve().parents[2]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"dupstudio {dupstudio.__version__}"


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "info" in out and "generate" in out


def test_info_table(capsys, tiny_model_dir):
    code, out, err = run_cli(capsys, "info", tiny_model_dir)
    assert code == 0, err
    lines = {ln.split("  ")[0]: ln for ln in out.splitlines() if ln}
    assert lines["blocks"].split()[-1] == "3"
    assert lines["hidden size"].split()[-1] == "256"
    assert lines["architecture"].split()[-1] == "llama"
    assert "tied" in lines["embeddings"]
    assert "1,869,568" in out
    for bits in ("16 bits", "4 bits", "3 bits", "2 bits"):
        assert bits in out
    assert "gate_proj" in out and "down_proj" in out
    assert "Traceback" not in err


def test_info_json(capsys, tiny_model_dir):
    code, out, _ = run_cli(capsys, "info", tiny_model_dir, "--json")
    assert code == 0
    d = json.loads(out)
    assert d["num_blocks"] == 3 and d["hidden_size"] == 256 and d["matrices_per_block"] == 7
    assert len(d["blocks"]) == 3 and d["tied_embeddings"] is True


def test_info_blocks_lists_every_block(capsys, tiny_model_dir):
    code, out, _ = run_cli(capsys, "info", tiny_model_dir, "--blocks")
    assert code == 0
    rows = [ln.split() for ln in out.splitlines() if ln.split()[:1] in (["0"], ["1"], ["2"])
            and "bits" not in ln]
    assert len(rows) == 3 * 7


def test_generate_streams_and_reports_speed(capsys, tiny_model_dir):
    code, out, err = run_cli(capsys, "generate", tiny_model_dir, "--prompt", "Paris is",
                             "--max-tokens", "6", "--no-chat")
    assert code == 0, err
    assert out.endswith("\n")
    assert "prompt:" in err and "tokens/s" in err
    gen = [ln for ln in err.splitlines() if ln.startswith("generation:")]
    assert gen and int(gen[0].split()[1]) <= 6
    # greedy is the default: the same command gives the same text
    code, out2, _ = run_cli(capsys, "generate", tiny_model_dir, "-p", "Paris is", "-n", "6", "--no-chat")
    assert out2 == out


def test_generate_chat_and_sampling_options(capsys, tiny_model_dir):
    code, out, err = run_cli(capsys, "generate", tiny_model_dir, "-p", "Hello", "-n", "4", "--chat",
                             "--temp", "0.8", "--seed", "1")
    assert code == 0, err
    assert "generation:" in err


@pytest.mark.parametrize("argv, words", [
    (["generate", "{tiny}", "-p", "x", "--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["generate", "{tiny}", "-p", "x", "--temp", "-1"], "--temp must be at least 0.0"),
])
def test_generate_bad_arguments(capsys, tiny_model_dir, argv, words):
    code, out, err = run_cli(capsys, *[a.replace("{tiny}", str(tiny_model_dir)) for a in argv])
    assert code == 2
    assert err.strip().startswith("dupstudio: error:") and words in err


def _bad_inputs(tiny: Path, tmp: Path):
    cases = []
    d = tmp / "empty-folder"
    d.mkdir(parents=True)
    cases.append((d, "not a model folder"))
    d = tmp / "no-weights"
    shutil.copytree(tiny, d)
    (d / "model.safetensors").unlink()
    cases.append((d, "no *.safetensors"))
    d = tmp / "no-tokenizer"
    shutil.copytree(tiny, d)
    (d / "tokenizer.json").unlink()
    cases.append((d, "no tokenizer"))
    d = tmp / "corrupt"
    shutil.copytree(tiny, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 3])
    cases.append((d, "truncated"))
    d = tmp / "gpt2"
    shutil.copytree(tiny, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    cases.append((d, "unsupported architecture"))
    cases.append((tmp / "nowhere", "no such file or folder"))
    f = tmp / "model.gguf"
    f.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    cases.append((f, "not a GGUF file"))
    return cases


@pytest.mark.parametrize("command", ["info", "generate"])
def test_bad_inputs_exit_2_with_one_line(capsys, tmp_path, tiny_model_dir, command):
    for path, words in _bad_inputs(tiny_model_dir, tmp_path / command):
        extra = ["--prompt", "hi", "-n", "2"] if command == "generate" else []
        code, out, err = run_cli(capsys, command, path, *extra)
        lines = [ln for ln in err.splitlines() if ln.startswith("dupstudio: error:")]
        assert code == 2, (path, err)
        assert len(lines) == 1, err
        assert str(path) in lines[0] and words in lines[0], lines[0]
        assert "Traceback" not in err and out == ""


def test_python_m_dupstudio_and_console_script(tiny_model_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "DUPSTUDIO_NO_PRELOAD")}
    r = subprocess.run([sys.executable, "-m", "dupstudio", "--version"], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"dupstudio {dupstudio.__version__}"
    r = subprocess.run([sys.executable, "-m", "dupstudio", "info", str(tiny_model_dir), "--json"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["num_blocks"] == 3
    r = subprocess.run([sys.executable, "-m", "dupstudio", "info", str(tiny_model_dir / "nope")],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such file" in r.stderr


OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.path.exists(OPENBLAS)),
                    reason="the OpenBLAS preload applies on Linux with Debian's libopenblas0")
def test_console_script_preloads_openblas():
    script = Path(sys.executable).parent / "dupstudio"
    if not script.exists():
        pytest.skip(f"{script} not installed (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "DUPSTUDIO_NO_PRELOAD")}
    env["QT_QPA_PLATFORM"] = "offscreen"
    r = subprocess.run([str(script), "--self-test"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OpenBLAS preloaded" in r.stdout, r.stdout


def test_self_test_in_process(capsys):
    code = main(["--self-test"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert len(out.strip().splitlines()) == 1 and out.startswith("dupstudio self-test: OK")


@pytest.mark.slow
def test_info_default_model(capsys, default_loaded):
    code, out, err = run_cli(capsys, "info", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["num_blocks"] == 30 and d["hidden_size"] == 576 and d["matrices_per_block"] == 7
    assert round(d["parameters"] / 1e6, 1) == 134.5 and d["tied_embeddings"] is True
    code, out, err = run_cli(capsys, "info")
    assert code == 0 and "134.5M" in out


@pytest.mark.slow
def test_generate_default_model_paris(capsys, default_loaded):
    code, out, err = run_cli(capsys, "generate", "--prompt", "What is the capital of France?",
                             "--max-tokens", "16")
    assert code == 0, err
    assert "Paris" in out
    assert "tokens/s" in err
