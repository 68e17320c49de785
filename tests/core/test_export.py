"""Export to mlx-lm folders (tiny model): each export loads in a fresh interpreter that can import
only mlx/mlx-lm, gives dupstudio's deploy logits, generates, and shares codes between replicas."""
import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from dupstudio.core import config as C
from dupstudio.core.calibrate import calibrate, settings_from
from dupstudio.core.evaluate import tokenize
from dupstudio.core.export import MODEL_FILE, export_model, preview_export
from dupstudio.core.jobs import CancelToken, Cancelled, DupstudioError
from dupstudio.core.model_io import model_shape, open_model
from dupstudio.core.replicate import build
from dupstudio.core.testing import make_tiny_llama, tiny_text

TOKENS = np.array([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 200, 33, 8, 77, 150, 21]], dtype=np.int32)

LOADER = textwrap.dedent(r'''
    import json, sys
    spec = json.load(open(sys.argv[1]))
    sys.path.extend(spec["site_packages"])  # run with -I -S: no .pth files, so no editable dupstudio
    import numpy as np
    res = {}
    try:
        import dupstudio  # noqa: F401
        res["dupstudio_importable"] = True
    except ImportError:
        res["dupstudio_importable"] = False
    import mlx.core as mx
    from mlx_lm import generate, load
    tokens = mx.array(np.load(spec["tokens"]))
    for name, d in spec["exports"].items():
        r = res[name] = {}
        if d["trust"]:
            try:
                load(d["path"])
                r["refused_without_trust"] = False
            except ValueError as e:
                r["refused_without_trust"] = "trust_remote_code" in str(e)
        model, tok = load(d["path"], trust_remote_code=d["trust"])
        r["class"] = type(model).__module__ + "." + type(model).__name__
        logits = model(tokens)
        np.save(d["logits"], np.array(logits.astype(mx.float32)))
        # incremental decoding with mlx-lm's cache machinery equals the full forward
        from mlx_lm.models.cache import make_prompt_cache
        cache = make_prompt_cache(model)
        r["caches"] = len(cache)
        outs = [model(tokens[:, :9], cache=cache)]
        for t in range(9, tokens.shape[1]):
            outs.append(model(tokens[:, t:t + 1], cache=cache))
        inc = np.array(mx.concatenate(outs, axis=1).astype(mx.float32))
        r["incremental_max_err"] = float(np.abs(inc - np.array(logits.astype(mx.float32))).max())
        r["text"] = generate(model, tok, "The quick brown fox", max_tokens=5)
        r["chat_template"] = bool(tok.chat_template)
        if d["trust"]:
            blocks = model.model.layers
            r["shared"] = all(
                b.replicas[0].self_attn.q_proj.weight is rep.self_attn.q_proj.weight
                and b.replicas[0].mlp.down_proj.weight is rep.mlp.down_proj.weight
                for b in blocks for rep in b.replicas)
            r["passes"] = len(model.layers)
    json.dump(res, open(spec["out"], "w"))
''')


@pytest.fixture(scope="module")
def shape(tiny_loaded):
    return model_shape(tiny_loaded.config)


@pytest.fixture(scope="module")
def calib_tokens(tiny_loaded):
    ids = tokenize(tiny_loaded.tokenizer, tiny_text(4000))
    return ids[: 4 * 32].reshape(4, 32)


@pytest.fixture(scope="module")
def untied_loaded(tmp_path_factory):
    return open_model(make_tiny_llama(tmp_path_factory.mktemp("untied") / "tiny-untied", tied=False))


def _site_packages() -> list:
    """The folders holding mlx and mlx_lm (and their dependencies), without the repository.
    The fresh interpreter runs with -I -S and appends only these, so an editable install of
    dupstudio (a .pth finder) is not active there."""
    import importlib.util
    from pathlib import Path

    dirs = []
    for mod in ("mlx.core", "mlx_lm", "numpy", "transformers"):
        origin = Path(importlib.util.find_spec(mod).origin)
        d = origin.parents[1]  # <site-packages>/<package>/<file>
        if str(d) not in dirs:
            dirs.append(str(d))
    repo = Path(__file__).resolve().parents[2]
    assert not any(Path(d).resolve() == repo for d in dirs)
    return dirs


def _fast(**kw):
    return settings_from("fast", steps=3, seqs=4, seq_len=32, batch=2, **kw)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_loaded, untied_loaded, shape, calib_tokens):
    """name -> dict(path, trust, ref logits, cfg); one fresh-interpreter run loads them all."""
    root = tmp_path_factory.mktemp("exports")
    cases = {}

    k1 = C.new_config(shape, source=str(tiny_loaded.path))
    cases["k1"] = (tiny_loaded, k1, "float32")
    k1g = calibrate(tiny_loaded, k1, calib_tokens, _fast(gains=True))
    assert any(".row_gain" in k for k in k1g.tensors) and any(".col." in k for k in k1g.tensors)
    cases["k1_gains"] = (tiny_loaded, k1g, "float32")
    k2s = calibrate(tiny_loaded, C.new_config(shape, replicas=2, mode="serial"), calib_tokens,
                    _fast(gains=True, residual_gain=True))
    cases["k2_serial"] = (tiny_loaded, k2s, "float32")
    k2p = C.new_config(shape, replicas=2, mode="parallel", init="lsq")
    k2p.blocks[1].gains = [0.7, 0.4]
    k2p.blocks[2].residual_gain = 0.8
    cases["k2_parallel"] = (tiny_loaded, k2p, "float32")
    k1b = C.new_config(shape)
    k1b.blocks[1].residual_gain = 0.9
    cases["k1_beta"] = (tiny_loaded, k1b, "float32")
    # default storage type (float16), compared with a float16 deploy model
    cases["k2_serial_f16"] = (tiny_loaded, C.new_config(shape, replicas=2, mode="serial",
                                                         init="gamma"), "float16")
    # untied head, quantized embedding and head
    ush = model_shape(untied_loaded.config)
    cases["untied_qemb_k1"] = (untied_loaded, C.new_config(ush, embedding_bits=4), "float32")
    cases["untied_qemb_k2"] = (untied_loaded, C.new_config(ush, replicas=2, mode="parallel",
                                                           embedding_bits=4), "float32")
    out, spec = {}, {"tokens": str(root / "tokens.npy"), "out": str(root / "results.json"),
                     "exports": {}, "site_packages": _site_packages()}
    np.save(spec["tokens"], TOKENS)
    for name, (loaded, cfg, dtype) in cases.items():
        r = export_model(loaded, cfg, root / name, dtype=dtype, ppl=12.5)
        ref = build(loaded, cfg, "deploy", dtype=getattr(mx, dtype))(mx.array(TOKENS))
        out[name] = {"result": r, "cfg": cfg, "loaded": loaded, "dtype": dtype,
                     "ref": np.array(ref.astype(mx.float32)), "logits": str(root / f"{name}.npy")}
        spec["exports"][name] = {"path": r["path"], "trust": r["trust_remote_code"],
                                 "logits": out[name]["logits"]}
    (root / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    script = root / "load_exports.py"
    script.write_text(LOADER)
    cwd = tmp_path_factory.mktemp("elsewhere")
    proc = subprocess.run([sys.executable, "-I", "-S", str(script), str(root / "spec.json")], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((root / "results.json").read_text())
    return {"cases": out, "sub": results}


def test_fresh_interpreter_cannot_import_dupstudio(exports):
    assert exports["sub"]["dupstudio_importable"] is False


@pytest.mark.parametrize("name,replicated", [
    ("k1", False), ("k1_gains", False), ("k2_serial", True), ("k2_parallel", True),
    ("k1_beta", True), ("k2_serial_f16", True), ("untied_qemb_k1", False), ("untied_qemb_k2", True),
])
def test_export_loads_with_mlx_lm_and_matches_deploy(exports, name, replicated):
    case, sub = exports["cases"][name], exports["sub"][name]
    r = case["result"]
    assert r["trust_remote_code"] is replicated
    if replicated:
        assert sub["refused_without_trust"] is True
        assert sub["class"] == "custom_model.Model"
        assert sub["shared"] is True
        assert sub["passes"] == sum(b.replicas for b in case["cfg"].blocks)
        assert sub["caches"] == sub["passes"]
    else:
        assert sub["class"] == "mlx_lm.models.llama.Model"
    got = np.load(case["logits"])
    ref = case["ref"]
    scale = float(np.abs(ref).max())
    tol = 1e-5 if case["dtype"] == "float32" else 2e-2
    assert np.abs(got - ref).max() <= tol * max(1.0, scale), np.abs(got - ref).max()
    assert sub["incremental_max_err"] < (1e-3 if case["dtype"] == "float32" else 5e-2) * max(1.0, scale)
    assert isinstance(sub["text"], str) and sub["chat_template"]


def test_export_folder_contents(exports):
    case = exports["cases"]["k2_serial"]
    path = case["result"]["path"]
    names = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "README.md", MODEL_FILE} <= names
    conf = json.load(open(os.path.join(path, "config.json")))
    assert conf["model_file"] == MODEL_FILE
    q = conf["quantization"]
    assert q["model.layers.0.replicas.1.self_attn.q_proj"] == {"group_size": 64, "bits": 2}
    assert q["model.embed_tokens"] is False
    blocks = conf["dupstudio"]["blocks"]
    assert [b["gains"] for b in blocks] == [case["cfg"].blocks[k].gains for k in range(3)]
    # codes stored once per block, each replica its own scales
    keys = mx.load(os.path.join(path, "model.safetensors")).keys()
    assert sum(1 for k in keys if k.endswith("q_proj.weight") or ".codes.q_proj" in k) == 3
    assert "model.layers.0.replicas.1.self_attn.q_proj.scales" in keys
    readme = open(os.path.join(path, "README.md")).read()
    assert "--trust-remote-code" in readme and "12.500" in readme and "bits per weight" in readme
    k1 = exports["cases"]["k1"]["result"]["path"]
    conf1 = json.load(open(os.path.join(k1, "config.json")))
    assert "model_file" not in conf1
    assert conf1["quantization"]["model.layers.2.mlp.down_proj"] == {"group_size": 64, "bits": 2}
    assert "trust-remote-code" not in open(os.path.join(k1, "README.md")).read()
    qe = json.load(open(os.path.join(exports["cases"]["untied_qemb_k1"]["result"]["path"], "config.json")))
    assert qe["quantization"]["lm_head"] == {"group_size": 64, "bits": 4}


def test_preview_matches_export(exports):
    for name in ("k1", "k2_serial", "untied_qemb_k2", "k2_serial_f16"):
        case = exports["cases"][name]
        pv = preview_export(case["loaded"], case["cfg"], dtype=case["dtype"])
        r = case["result"]
        assert pv["bits_per_weight"] == r["bits_per_weight"]
        assert pv["trust_remote_code"] == r["trust_remote_code"]
        assert abs(pv["weights_bytes"] - r["weights_bytes"]) <= 64
        assert abs(pv["bytes"] - r["bytes"]) <= 0.002 * r["bytes"]


def test_bits_per_weight_and_size(exports):
    k1, k2 = exports["cases"]["k1"]["result"], exports["cases"]["k2_parallel"]["result"]
    assert k1["bits_per_weight"] == pytest.approx(2.5)
    assert k2["bits_per_weight"] == pytest.approx(3.0, abs=1e-3)
    assert k2["weights_bytes"] < 1.25 * k1["weights_bytes"]


def test_cancelled_export_leaves_nothing(tmp_path, tiny_loaded, shape):
    cfg = C.new_config(shape, replicas=2)
    token = CancelToken()

    def progress(frac, msg):
        if frac is not None and frac > 0.5:
            token.cancel()

    with pytest.raises(Cancelled):
        export_model(tiny_loaded, cfg, tmp_path / "out", progress=progress, cancel=token)
    assert os.listdir(tmp_path) == []


def test_half_written_export_never_looks_complete(tmp_path, tiny_loaded, shape, monkeypatch):
    cfg = C.new_config(shape)
    seen = []

    def progress(frac, msg):
        if frac is not None and frac >= 0.98 and frac < 1.0:
            # everything is written, not yet renamed: only a hidden partial folder exists
            seen.append(sorted(os.listdir(tmp_path)))

    export_model(tiny_loaded, cfg, tmp_path / "out", progress=progress)
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0].startswith(".out.partial-")
    assert os.listdir(tmp_path) == ["out"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o777 & ~umask
    # a failure while writing (here: the disk fills up at the tokenizer) removes the partial folder
    import dupstudio.core.export as E

    real = E.atomic_write_bytes

    def full(path, data, **kw):
        if Path(path).name == "tokenizer.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data, **kw)

    monkeypatch.setattr(E, "atomic_write_bytes", full)
    with pytest.raises(DupstudioError, match="out2: cannot write: the disk is full"):
        export_model(tiny_loaded, cfg, tmp_path / "out2")
    assert os.listdir(tmp_path) == ["out"]


def test_existing_folder_refused_unless_overwrite(tmp_path, tiny_loaded, shape):
    cfg = C.new_config(shape)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(DupstudioError, match="not empty"):
        export_model(tiny_loaded, cfg, tmp_path / "out")
    # not an export: --overwrite refuses rather than deleting the folder
    with pytest.raises(DupstudioError, match="not a dupstudio export"):
        export_model(tiny_loaded, cfg, tmp_path / "out", overwrite=True)
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_overwrite_replaces_only_what_the_export_wrote(tmp_path, tiny_loaded, shape):
    out = tmp_path / "out"
    export_model(tiny_loaded, C.new_config(shape, replicas=2), out)
    assert (out / MODEL_FILE).exists() and (out / "dupstudio-export.json").exists()
    (out / "notes.txt").write_text("mine")
    cfg_path = C.save(C.new_config(shape), out / "exp.json")
    r = export_model(tiny_loaded, C.new_config(shape), out, overwrite=True, inputs=(cfg_path,))
    assert (out / "notes.txt").read_text() == "mine" and cfg_path.exists()
    assert not (out / MODEL_FILE).exists() and not r["trust_remote_code"]
    assert MODEL_FILE not in json.loads((out / "dupstudio-export.json").read_text())["files"]
    assert os.listdir(tmp_path) == ["out"]
    # an input listed in the manifest (a config saved over an exported file) is never replaced
    C.save(C.new_config(shape), out / "README.md")
    with pytest.raises(DupstudioError, match="README.md: is an input of this export"):
        export_model(tiny_loaded, C.new_config(shape), out, overwrite=True, inputs=(out / "README.md",))
    # a file dupstudio did not write, under a name the export uses, is not replaced
    (out / "tokenizer.json").unlink()
    (out / "dupstudio-export.json").write_text(json.dumps({"files": {"model.safetensors": 1}}))
    (out / "tokenizer.json").write_text("{}")
    with pytest.raises(DupstudioError, match="was not written by dupstudio"):
        export_model(tiny_loaded, C.new_config(shape), out, overwrite=True)
    with pytest.raises(DupstudioError, match="is an input of this export"):
        export_model(tiny_loaded, C.new_config(shape), tiny_loaded.path, overwrite=True)


def test_litter_of_a_killed_export_is_removed(tmp_path, tiny_loaded, shape, capsys):
    import subprocess
    import sys

    from dupstudio.core import safeio

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    for kind in ("partial", "old"):
        d = tmp_path / f".out.{kind}-{child.pid}-0123abcd"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
    safeio._swept.discard(str(tmp_path.absolute()))
    export_model(tiny_loaded, C.new_config(shape), tmp_path / "out")
    assert os.listdir(tmp_path) == ["out"]
    assert "removed 2 temporary file(s)" in capsys.readouterr().err


def test_refusals_name_the_block_or_tensor(tiny_loaded, shape, tmp_path):
    cfg = C.new_config(shape)
    cfg.blocks[1].residual_gain = 0.9
    with pytest.raises(DupstudioError, match=r"block 1: residual gain β = 0.9"):
        export_model(tiny_loaded, cfg, tmp_path / "a", require_standard=True)
    k2 = C.new_config(shape, replicas=2, layers=[2])
    with pytest.raises(DupstudioError, match=r"block 2: K = 2"):
        preview_export(tiny_loaded, k2, require_standard=True)
    odd = C.new_config(shape)
    odd.tensors["b0.r0.q_proj.lora_a"] = mx.zeros((4,))
    with pytest.raises(DupstudioError, match="b0.r0.q_proj.lora_a"):
        export_model(tiny_loaded, odd, tmp_path / "b")
    assert os.listdir(tmp_path) == []


def test_cli_export(tmp_path, tiny_loaded, tiny_model_dir, shape, capsys):
    from dupstudio.cli import main

    cfg = C.new_config(shape, source=str(tiny_model_dir), replicas=2, mode="serial")
    C.save(cfg, tmp_path / "cfg.json")
    rc = main(["export", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "exp"), "--ppl", "9.5"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "bits per weight 3.0" in out and str(tmp_path / "exp") in out and "--trust-remote-code" in out
    assert (tmp_path / "exp" / "model.safetensors").exists()
    assert "9.500" in (tmp_path / "exp" / "README.md").read_text()
    rc = main(["export", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "exp")])
    assert rc == 2 and "not empty" in capsys.readouterr().err
