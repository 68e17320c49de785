"""Opening, validating and describing models (model_io), text generation (core.generate), and
the default model's sanity figures (slow)."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dupstudio.core.jobs import DupstudioError
from dupstudio.core.model_io import (
    MATRIX_NAMES,
    block_linears,
    describe,
    model_shape,
    open_model,
)

WIKITEXT = Path(__file__).resolve().parents[2].parent / "shared/data/wikitext2-test.txt"


# --------------------------------------------------------------------------- the tiny model
def test_describe_tiny_model(tiny_loaded, tiny_model_dir):
    d = describe(tiny_loaded)
    assert d["architecture"] == "llama"
    assert d["num_blocks"] == 3 == tiny_loaded.num_blocks
    assert d["hidden_size"] == 256 and d["intermediate_size"] == 512
    assert d["num_heads"] == 4 and d["num_kv_heads"] == 2 and d["head_dim"] == 64
    assert d["matrices_per_block"] == 7
    assert d["tied_embeddings"] is True and d["head_parameters"] == 0
    per_block = 2 * 256 * 256 + 2 * 128 * 256 + 3 * 512 * 256
    assert d["linear_parameters"] == 3 * per_block
    assert d["parameters"] == d["linear_parameters"] + d["embedding_parameters"] + d["norm_parameters"]
    assert [m["name"] for m in d["blocks"][0]["matrices"]] == list(MATRIX_NAMES)
    assert d["blocks"][0]["matrices"][1]["shape"] == [128, 256]  # k_proj: (out, in)
    sizes = d["size_bytes"]
    assert sizes["16"] == 2 * d["parameters"]
    assert sizes["16"] > sizes["8"] > sizes["4"] > sizes["3"] > sizes["2"]
    other = sizes["16"] - 2 * d["linear_parameters"]
    assert (sizes["2"] - other) * 8 / d["linear_parameters"] == pytest.approx(2.5)  # 2-bit g64
    json.dumps(d)  # the description is plain JSON


def test_model_shape_and_block_linears(tiny_loaded):
    shp = model_shape(tiny_loaded.config)
    assert shp["num_blocks"] == 3 and shp["vocab_size"] == tiny_loaded.config["vocab_size"]
    mats = block_linears(tiny_loaded.model)
    assert len(mats) == 3 and set(mats[0]) == set(MATRIX_NAMES)
    assert tuple(mats[0]["down_proj"].shape) == (256, 512)


def test_tiny_model_forward_is_finite(tiny_loaded):
    import mlx.core as mx

    ids = mx.array([tiny_loaded.tokenizer.encode("Paris is the capital of France.")])
    logits = tiny_loaded.model(ids)
    assert logits.shape == (1, ids.shape[1], tiny_loaded.config["vocab_size"])
    assert logits.dtype == mx.float32
    assert bool(mx.all(mx.isfinite(logits)).item())


def test_generate_stream_tiny(tiny_loaded):
    from dupstudio.core.generate import generate_stream, generate_text, prompt_tokens

    tok = tiny_loaded.tokenizer
    chunks = list(generate_stream(tiny_loaded.model, tok, "Paris is", max_tokens=8, chat=False))
    assert chunks and chunks[-1].finish_reason in ("stop", "length")
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].generation_tokens <= 8
    assert chunks[-1].prompt_tokens == len(prompt_tokens(tok, "Paris is", chat=False))
    assert chunks[-1].generation_tps > 0 and chunks[-1].prompt_tps > 0
    # greedy decoding is deterministic
    text = "".join(c.text for c in chunks)
    assert generate_text(tiny_loaded.model, tok, "Paris is", 8, chat=False) == text
    # the chat template wraps the prompt in a user turn and adds the generation prompt
    chat_ids = prompt_tokens(tok, "Paris is", chat=True)
    chat_text = tok.decode(chat_ids)
    assert "<|im_start|>user" in chat_text and chat_text.rstrip().endswith("<|im_start|>assistant")


def test_generate_stream_rejects_bad_arguments(tiny_loaded):
    from dupstudio.core.generate import generate_stream

    with pytest.raises(DupstudioError, match="max-tokens"):
        list(generate_stream(tiny_loaded.model, tiny_loaded.tokenizer, "x", max_tokens=0))
    with pytest.raises(DupstudioError, match="empty"):
        list(generate_stream(tiny_loaded.model, tiny_loaded.tokenizer, [], max_tokens=3))


def test_generate_stream_can_be_cancelled(tiny_loaded):
    from dupstudio.core.generate import generate_stream
    from dupstudio.core.jobs import CancelToken, Cancelled

    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        list(generate_stream(tiny_loaded.model, tiny_loaded.tokenizer, "Paris", 5, chat=False, cancel=token))


def test_core_never_imports_qt():
    code = ("import sys, dupstudio.core.model_io, dupstudio.core.generate, dupstudio.core.jobs, "
            "dupstudio.core.testing, dupstudio.commands.info, dupstudio.commands.generate; "
            "bad = [m for m in sys.modules if m.startswith(('PySide6', 'pyqtgraph', 'dupstudio.gui'))]; "
            "sys.exit('core imported ' + ', '.join(bad) if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- bad inputs
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def bad_inputs(tiny: Path, tmp: Path) -> dict:
    """Broken model inputs -> (path, words the one-line message must contain)."""
    cases = {}
    d = tmp / "not-a-model"
    d.mkdir()
    (d / "readme.txt").write_text("hello")
    cases["folder that is not a model"] = (d, "not a model folder")

    d = _copy(tiny, tmp / "no-weights")
    (d / "model.safetensors").unlink()
    cases["missing weights"] = (d, "no *.safetensors")

    d = _copy(tiny, tmp / "no-tokenizer")
    (d / "tokenizer.json").unlink()
    cases["missing tokenizer"] = (d, "no tokenizer")

    d = _copy(tiny, tmp / "garbage-weights")
    (d / "model.safetensors").write_bytes(b"this is not a safetensors file" * 10)
    cases["corrupt safetensors (garbage)"] = (d, "corrupt safetensors file")

    d = _copy(tiny, tmp / "truncated-weights")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["corrupt safetensors (truncated)"] = (d, "truncated")

    d = _copy(tiny, tmp / "gpt2")
    _edit_config(d, model_type="gpt2")
    cases["unsupported architecture"] = (d, "unsupported architecture 'gpt2'")

    d = _copy(tiny, tmp / "no-model-type")
    _edit_config(d, model_type=None)
    cases["no model_type"] = (d, "no model_type")

    d = _copy(tiny, tmp / "bad-json")
    (d / "config.json").write_text("{oops")
    cases["malformed config.json"] = (d, "malformed config.json")

    d = _copy(tiny, tmp / "no-hidden")
    _edit_config(d, hidden_size=None)
    cases["config without hidden_size"] = (d, "lacks hidden_size")

    cases["non-existent path"] = (tmp / "does-not-exist", "no such file or folder")

    f = tmp / "notes.txt"
    f.write_text("just text")
    cases["a plain file"] = (f, "not a model")

    f = tmp / "fake.gguf"
    f.write_text("not a gguf file at all")
    cases["a file that is not a GGUF"] = (f, "not a GGUF file")

    cases["a missing .gguf"] = (tmp / "nothere.gguf", "no such file")
    return cases


@pytest.fixture(scope="module")
def bad_cases(tiny_model_dir, tmp_path_factory):
    return bad_inputs(tiny_model_dir, tmp_path_factory.mktemp("bad"))


CASE_NAMES = [
    "folder that is not a model", "missing weights", "missing tokenizer",
    "corrupt safetensors (garbage)", "corrupt safetensors (truncated)", "unsupported architecture",
    "no model_type", "malformed config.json", "config without hidden_size", "non-existent path",
    "a plain file", "a file that is not a GGUF", "a missing .gguf",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_raises_one_line_error_naming_the_path(bad_cases, case):
    path, words = bad_cases[case]
    with pytest.raises(DupstudioError) as exc:
        open_model(path)
    msg = str(exc.value)
    assert str(path) in msg, msg
    assert words in msg, msg
    assert "\n" not in msg


def test_bad_cases_cover_every_name(bad_cases):
    assert sorted(bad_cases) == sorted(CASE_NAMES)


# --------------------------------------------------------------------------- the default model
@pytest.mark.slow
def test_default_model_description(default_loaded):
    d = describe(default_loaded)
    assert d["architecture"] == "llama"
    assert d["num_blocks"] == 30
    assert d["hidden_size"] == 576
    assert d["matrices_per_block"] == 7
    assert d["tied_embeddings"] is True
    assert d["parameters"] == pytest.approx(134.5e6, rel=0.001)


@pytest.mark.slow
def test_default_model_knows_the_capital_of_france(default_loaded):
    from dupstudio.core.generate import generate_text

    answer = generate_text(default_loaded.model, default_loaded.tokenizer,
                           "What is the capital of France?", max_tokens=24, chat=True, temp=0.0)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_default_model_perplexity_4x512(default_loaded):
    """exp(mean NLL) on the first 4 non-overlapping 512-token windows of WikiText-2 test:
    inputs window[:-1], targets window[1:], no BOS, float32 (the evaluation protocol)."""
    if not WIKITEXT.exists():
        pytest.skip(f"{WIKITEXT} not found (the shared data folder sits beside the repository)")
    import mlx.core as mx
    import mlx.nn as nn

    ids = default_loaded.tokenizer.encode(WIKITEXT.read_text(encoding="utf-8"), add_special_tokens=False)
    ctx, n_windows = 512, 4
    assert len(ids) >= ctx * n_windows
    model = default_loaded.model
    assert model.model.embed_tokens.weight.dtype == mx.float32
    total, count = 0.0, 0
    for w in range(n_windows):
        window = mx.array(ids[w * ctx:(w + 1) * ctx])
        logits = model(window[None, :-1]).astype(mx.float32)
        nll = nn.losses.cross_entropy(logits[0], window[1:], reduction="sum")
        total += float(nll.item())
        count += ctx - 1
    ppl = math.exp(total / count)
    print(f"default model perplexity, {n_windows}x{ctx} WikiText-2 test tokens: {ppl:.2f}")
    assert 5 < ppl < 45, ppl


# --------------------------------------------------------------------------- sizes checked first
@pytest.mark.parametrize("changes,words", [
    ({"num_hidden_layers": 1_000_000_000}, "num_hidden_layers: 1000000000 is out of range"),
    ({"num_hidden_layers": 4}, "config.json says 4 blocks but the weight files hold 3"),
    ({"num_hidden_layers": "3"}, "num_hidden_layers: expected an integer, got the string '3'"),
    ({"hidden_size": 1 << 20}, "weight files hold only"),
    ({"num_attention_heads": 0}, "num_attention_heads: 0 is out of range"),
    ({"num_key_value_heads": 3}, "4 attention heads cannot be shared by 3"),
])
def test_patched_config_sizes_are_refused_before_loading(tmp_path, tiny_model_dir, changes, words):
    d = _copy(tiny_model_dir, tmp_path / "patched")
    _edit_config(d, **changes)
    with pytest.raises(DupstudioError, match=words) as exc:
        open_model(d)
    assert "\n" not in str(exc.value)


def test_safetensors_header_sizes_are_checked(tmp_path):
    import struct

    from dupstudio.core.safeio import read_safetensors_header

    def write(header: dict, data: bytes = b"") -> Path:
        raw = json.dumps(header).encode()
        p = tmp_path / "w.safetensors"
        p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        return p

    good = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    assert read_safetensors_header(write(good, b"\0" * 8))["a"]["shape"] == [2]
    bad = [({"a": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 8]}}, "shape: 1099511627776 is out of range"),
           ({"a": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, "unknown dtype"),
           ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1 << 50]}}, "truncated"),
           ({"a": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}}, "at most 8"),
           ({"a": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, "expected an integer")]
    for header, words in bad:
        with pytest.raises(DupstudioError, match=words):
            read_safetensors_header(write(header, b"\0" * 8))
    p = tmp_path / "huge.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(DupstudioError, match="header of 1152921504606846976 bytes"):
        read_safetensors_header(p)
