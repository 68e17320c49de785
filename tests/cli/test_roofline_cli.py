"""``dupstudio roofline`` and ``dupstudio bench`` in-process on the tiny model (structure only)."""
import json

import pytest

from dupstudio.cli import main
from dupstudio.core import config as C
from dupstudio.core import machine_profile as mp
from dupstudio.core.model_io import model_shape

KEYS = ("bandwidth_ms", "compute_ms", "overhead_ms", "predicted_ms")
TINY_BLOCK = {"hidden_size": 128, "intermediate_size": 256, "num_heads": 2, "num_kv_heads": 1, "head_dim": 64}


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def cfg_paths(tiny_model_dir, tmp_path_factory):
    import json as _json

    d = tmp_path_factory.mktemp("cfgs")
    cfg_json = _json.loads((tiny_model_dir / "config.json").read_text())
    shape = model_shape(cfg_json)
    paths = {}
    for name, kw in {"k1": {}, "k2": {"replicas": 2, "mode": "serial"}}.items():
        cfg = C.new_config(shape, source=str(tiny_model_dir), bits=2, group_size=64, **kw)
        paths[name] = C.save(cfg, d / f"{name}.json")
    return paths


@pytest.fixture
def tiny_machine(monkeypatch, tmp_path):
    """'machine' measures with tiny sizes into a private home (a few hundred ms)."""
    monkeypatch.setenv("DUPSTUDIO_HOME", str(tmp_path))
    real = mp.measure

    def fake(progress=None, cancel=None, **kw):
        return real(progress, cancel, sizes="tiny", block_shape=TINY_BLOCK, bits=(2, 4))

    monkeypatch.setattr(mp, "measure", fake)


def _check_keys(d):
    for phase in ("decode", "prefill"):
        assert set(d[phase]) == {"cache", "dram", "measured"}
        for a in ("cache", "dram", "measured"):
            for k in KEYS:
                assert isinstance(d[phase][a][k], float), (phase, a, k)
            e = d[phase][a]
            assert e["predicted_ms"] == pytest.approx(max(e["bandwidth_ms"], e["compute_ms"]) + e["overhead_ms"])


def test_roofline_json_config_has_three_assumptions(capsys, cfg_paths):
    code, out, err = run_cli(capsys, "roofline", cfg_paths["k2"], "--profile", "m1-pro", "--context", 100, "--json")
    assert code == 0, err
    d = json.loads(out)
    _check_keys(d)
    assert d["profile"] == "apple-m1-pro" and d["context"] == 100
    assert d["passes"]["decode"] == 6
    assert d["decode"]["dram"]["bytes"] > d["decode"]["cache"]["bytes"]


def test_roofline_text_and_every_profile_name(capsys, cfg_paths):
    from dupstudio.core.roofline import load_profiles_doc

    for name in load_profiles_doc()["profiles"]:
        code, out, err = run_cli(capsys, "roofline", cfg_paths["k1"], "--profile", name)
        assert code == 0, (name, err)
        assert "decode, per token" in out and "measured" in out and "dram" in out


def test_roofline_shape_without_model(capsys):
    code, out, err = run_cli(capsys, "roofline", "--shape", "llama-2-7b", "--bits", 2, "--replicas", 2,
                             "--mode", "serial", "--profile", "apple-m1-pro", "--json")
    assert code == 0, err
    d = json.loads(out)
    _check_keys(d)
    assert d["shape"]["hidden_size"] == 4096 and d["passes"]["decode"] == 64
    code, out, _ = run_cli(capsys, "roofline", "--shape", "llama-3-8b", "--bits", 16, "--json")
    assert code == 0
    assert json.loads(out)["plans"][0]["bits"] == 16


def test_roofline_machine_profile(capsys, cfg_paths, tiny_machine):
    code, out, err = run_cli(capsys, "roofline", cfg_paths["k1"], "--profile", "machine", "--json")
    assert code == 0, err
    d = json.loads(out)
    _check_keys(d)
    assert d["profile"] == "machine"


@pytest.mark.parametrize("argv,words", [
    (["--shape", "llama-2-7b", "--profile", "m7-ultra"], "unknown hardware profile 'm7-ultra'"),
    ([], "give a configuration"),
    (["CFG", "--shape", "llama-2-7b"], "not both"),
    (["/nonexistent/cfg.json"], "no such configuration file"),
])
def test_roofline_errors_are_clean(capsys, cfg_paths, argv, words):
    argv = [str(cfg_paths["k1"]) if a == "CFG" else a for a in argv]
    code, out, err = run_cli(capsys, "roofline", *argv)
    assert code == 2
    assert words in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bench_json_on_tiny_model(capsys, cfg_paths, tiny_machine):
    code, out, err = run_cli(capsys, "bench", cfg_paths["k2"], "--prompt-tokens", 5, "--gen-tokens", 2,
                             "--repetitions", 1, "--warmup", 0, "--profile", "m1-pro", "--reference-mlx-lm",
                             "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["machine_profile"] == "machine" and d["profile"] == "apple-m1-pro"
    first = d["results"][0]
    assert first["measured"]["passes"] == 6
    assert set(first["comparison"]["decode"]["assumptions"]) == {"cache", "dram", "measured"}
    assert "default" in d["wrapper_ratio"]
    # text report
    code, out, err = run_cli(capsys, "bench", cfg_paths["k1"], "--prompt-tokens", 4, "--gen-tokens", 2,
                             "--repetitions", 1, "--warmup", 0, "--fp")
    assert code == 0, err
    assert "measured vs predicted on this machine" in out and "predicted on Apple M1 Pro" in out


def test_bench_unknown_profile_fails_before_loading(capsys, cfg_paths):
    code, _, err = run_cli(capsys, "bench", cfg_paths["k1"], "--profile", "nope")
    assert code == 2 and "unknown hardware profile 'nope'" in err
