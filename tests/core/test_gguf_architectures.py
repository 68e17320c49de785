"""GGUF files of qwen2, qwen3, gemma3 and phi3, written as llama.cpp writes them, convert and open.

For each architecture a tiny random mlx-lm model (dupstudio.core.testing.make_tiny_model) is
written to GGUF with ``gguf.GGUFWriter`` the way llama.cpp's ``convert_hf_to_gguf.py`` and
``llama-quantize`` would: its metadata keys, the tensor names of the gguf package's own
``TensorNameMap`` (the converter's map, independent of dupstudio's), its changes to the weights
(Gemma's norms stored as 1 + w, Gemma's embedding cut to the vocabulary, phi3's fused matrices
and padded vocabulary, no q/k row permutation outside the llama family) and a Q4_K_M-like mix
of tensor types (Q4_K, Q6_K for some attn_v/ffn_down, Q5_K for phi3's attn_qkv, llama.cpp's
Q5_0/Q5_1/Q8_0 fallbacks where a row is not a multiple of 256, F32 norms, plus one Q8_0 and one
F16 matrix per file). The k-quants come from random valid blocks (the gguf package cannot
quantize them); everything is decoded for the reference by the package's own dequantizer.

The converted model's logits must equal those of mlx-lm's model of the same type holding the
reference weights. Gemma 3 and phi3 carry SentencePiece vocabularies trained with the
sentencepiece library, and the rebuilt tokenizers must encode as sentencepiece does.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

gg = pytest.importorskip("gguf", reason="the gguf package (llama.cpp's writer and reference "
                                          "decoder) is in the test extra: pip install -e '.[test]'")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T  # noqa: E402
from gguf import quants as gq  # noqa: E402

import mlx.core as mx  # noqa: E402

from dupstudio.core import gguf  # noqa: E402
from dupstudio.core.jobs import DupstudioError  # noqa: E402
from dupstudio.core.model_io import open_model  # noqa: E402
from dupstudio.core.testing import CHAT_TEMPLATE, SPECIALS, _CORPUS, make_tiny_model, make_tokenizer  # noqa: E402

#: GGUF architecture -> the mlx-lm model type it converts to
MODEL_TYPES = {"qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text", "phi3": "phi3"}

#: test cases: (GGUF architecture, make_tiny_model arguments, what the case adds)
CASES = {
    "qwen2": ("qwen2", {}),  # q/k/v biases, tied head
    "qwen3": ("qwen3", {}),  # per-head q/k norms, untied head, head_dim from key_length
    # six blocks, every sixth global: the pattern llama.cpp assumes for every Gemma 3 file (its
    # converter stores none); √320 is not a power of two and 320-wide rows take the fallbacks
    "gemma3": ("gemma3", {"layers": 6, "extra": {"sliding_window_pattern": 6}}),
    "phi3": ("phi3", {}),  # fused qkv and gate_up, untied head, padded SentencePiece vocabulary
    # a file that states its sliding-window pattern (every other block global)
    "gemma3-pattern": ("gemma3", {"extra": {"sliding_window_pattern": 2}}),
    # Qwen's long-context yarn settings
    "qwen2-yarn": ("qwen2", {"extra": {"max_position_embeddings": 8192, "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}}}),
    # Phi-3.5-style long-context factors (stored as tensors), partial rotary and a tied head
    # (Phi-4-mini's settings)
    "phi3-longrope": ("phi3", {"tied": True, "extra": {
        "max_position_embeddings": 8192, "original_max_position_embeddings": 2048,
        "partial_rotary_factor": 0.75, "rope_scaling": {
            "type": "longrope",
            "long_factor": [1.0 + 0.25 * i for i in range(24)],
            "short_factor": [1.0 + 0.01 * i for i in range(24)]}}}),
}


# ------------------------------------------------------------------ tensor types


def random_blocks(qtype: str, shape, rng, amplitude: float) -> np.ndarray:
    """Random valid k-quant blocks for a tensor of ``shape`` (the gguf package cannot quantize
    k-quants): random quant and sub-block scale bytes, small finite fp16 super-block scales, so
    that the weights stay within about +-amplitude."""
    fp16_fields = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
    max_product = {"Q4_K": 945, "Q5_K": 1953, "Q6_K": 4096}
    block, nbytes = GGML_QUANT_SIZES[T[qtype]]
    rows = int(np.prod(shape[:-1]))
    raw = rng.integers(0, 256, (rows, shape[-1] // block * nbytes), dtype=np.uint8)
    blocks = raw.reshape(-1, nbytes)
    for off in fp16_fields[qtype]:
        scale = rng.uniform(-1, 1, len(blocks)) * amplitude / max_product[qtype]
        blocks[:, off:off + 2] = scale.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the blocks whose attn_v/ffn_down Q4_K_M raises to Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


#: llama.cpp's replacement when a row is not a multiple of the k-quants' 256
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def q4_k_m_type(gguf_name: str, shape, n_blocks: int) -> str:
    """The type llama-quantize's Q4_K_M gives a tensor (simplified to what these models hold),
    with one Q8_0 and one F16 matrix added so that every file holds those too."""
    parts = gguf_name.split(".")
    if len(shape) == 1:
        return "F32"  # norms, biases, rope factors
    if parts[0] != "blk":
        t = "Q6_K" if parts[0] == "output" else "Q4_K"
    else:
        bid, stem = int(parts[1]), parts[2]
        if (bid, stem) == (0, "ffn_down"):
            return "Q8_0"
        if (bid, stem) == (n_blocks - 1, "attn_output"):
            return "F16"
        if stem in ("attn_v", "ffn_down"):
            t = "Q6_K" if _more_bits(bid, n_blocks) else "Q4_K"
        elif stem == "attn_qkv":
            t = "Q5_K"
        else:
            t = "Q4_K"
    return FALLBACK[t] if shape[-1] % 256 else t


def encode(qtype: str, x: np.ndarray, rng) -> np.ndarray:
    """``x`` in ``qtype`` as GGUFWriter takes it; k-quants: random valid blocks of x's scale."""
    if qtype == "F32":
        return x.astype(np.float32)
    if qtype == "F16":
        return x.astype(np.float16)
    if qtype in ("Q4_K", "Q5_K", "Q6_K"):
        return random_blocks(qtype, x.shape, rng, amplitude=2.0 / x.shape[-1] ** 0.5)
    return gq.quantize(x.astype(np.float32), T[qtype])


def decode(qtype: str, data: np.ndarray, shape) -> np.ndarray:
    if qtype == "F32":
        return data
    return gq.dequantize(data, T[qtype]).astype(np.float32).reshape(shape)


# ------------------------------------------------------------------ vocabularies


def bpe_vocab() -> dict:
    """The tiny model's byte-level BPE vocabulary as llama.cpp's _set_vocab_gpt2 writes it for
    Qwen (pre-tokenizer "qwen2", added tokens as control tokens, no BOS)."""
    model = json.loads(make_tokenizer().to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {"model": "gpt2", "pre": "qwen2", "tokens": tokens, "merges": merges,
            "types": [3 if t in SPECIALS else 1 for t in tokens],
            "eos": tokens.index("<|im_end|>"), "pad": tokens.index("<|endoftext|>"), "add_bos": False}


def train_spm(add_dummy_prefix: bool, gemma: bool):
    """A small SentencePiece BPE model with byte fallback, trained on the tiny corpus, set up as
    the real ones are: no whitespace normalisation, a dummy prefix for llama/phi3 but not for
    Gemma, Gemma's <pad>/<eos>/<bos>/<unk> ids and a user-defined <start_of_turn>."""
    import sentencepiece as spm

    buf = io.BytesIO()
    ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
               bos_piece="<bos>") if gemma else {}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines() * 3), model_writer=buf, vocab_size=360,
        model_type="bpe", byte_fallback=True, add_dummy_prefix=add_dummy_prefix,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, user_defined_symbols=["<start_of_turn>"], minloglevel=2, **ids)
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def spm_vocab(sp, *, pad_to: int = 0, gemma: bool) -> dict:
    """A SentencePiece model's vocabulary as llama.cpp's _create_vocab_sentencepiece writes it
    (phi3's converter pads it to the model's vocabulary with unused [PADn] pieces)."""
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i)
                     else 6 if sp.is_byte(i) else 4 if tokens[-1] == "<start_of_turn>" else 1)
    for i in range(len(tokens), pad_to):
        tokens.append(f"[PAD{i}]")
        scores.append(-10000.0)
        types.append(5)
    return {"model": "llama", "pre": "default", "tokens": tokens, "scores": scores, "types": types,
            "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(),
            "pad": sp.pad_id() if sp.pad_id() >= 0 else None,
            # (Gemma's tokenizer adds a BOS, Phi-3's does not)
            "add_bos": gemma, "add_space_prefix": None if not gemma else False}


# ------------------------------------------------------------------ a llama.cpp-style writer


def write_like_llama_cpp(src: Path, path: Path, arch: str, vocab: dict, rng) -> dict:
    """Write the mlx-lm model at ``src`` as llama.cpp's converter and Q4_K_M quantizer would;
    return {mlx-lm name: reference float32 weight} (what the file decodes to, with the
    converter's changes undone by hand) and the tensor types used."""
    cfg = json.loads((src / "config.json").read_text())
    hf = {k: np.array(v, dtype=np.float32) for k, v in mx.load(str(src / "model.safetensors")).items()}
    n_blocks, hidden, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    w = gg.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    # TextModel.set_gguf_parameters and the architectures' own additions
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(n_blocks)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    if "head_dim" in cfg:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    scaling = cfg.get("rope_scaling")
    if arch == "gemma3":
        w.add_sliding_window(cfg["sliding_window"])
        if cfg["sliding_window_pattern"] != 6:  # (not the converter's: another writer's file)
            w.add_sliding_window_pattern(cfg["sliding_window_pattern"])
    if arch == "phi3":
        rope_dims = int(cfg.get("partial_rotary_factor", 1.0) * hidden) // heads
        w.add_rope_scaling_orig_ctx_len(cfg["original_max_position_embeddings"])
        w.add_rope_dimension_count(rope_dims)
        w.add_sliding_window(cfg.get("sliding_window") or 0)
        if scaling:  # generate_extra_tensors: the factors as tensors, and the attention factor
            scale = cfg["max_position_embeddings"] / cfg["original_max_position_embeddings"]
            w.add_rope_scaling_type(gg.RopeScalingType.LONGROPE)
            w.add_rope_scaling_attn_factors(
                float(np.sqrt(1 + np.log(scale) / np.log(cfg["original_max_position_embeddings"]))))
    elif scaling and scaling["type"] == "yarn":
        w.add_rope_scaling_type(gg.RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    w.add_file_type(gg.LlamaFileType.MOSTLY_Q4_K_M)
    _write_vocab(w, vocab)

    tmap = gg.get_tensor_name_map(gg.MODEL_ARCH[arch.upper()], n_blocks)
    refs, types = {}, {}
    tensors = []
    for name, x in hf.items():
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        if arch == "gemma3" and name.endswith("norm.weight"):
            stored = x + np.float32(1)  # Gemma3Model.modify_tensors: Gemma3RMSNorm's 1 + w
        elif arch == "gemma3" and name == "model.embed_tokens.weight":
            stored = x = x[:len(vocab["tokens"])]  # the rows beyond the vocabulary are dropped
        else:
            stored = x
        tensors.append((new, name, x, stored))
    if arch == "phi3" and scaling:
        for key in ("long_factor", "short_factor"):
            f = np.array(scaling[key], dtype=np.float32)
            tensors.append((f"rope_factors_{key.split('_')[0]}.weight", None, f, f))
    for new, name, x, stored in tensors:
        qtype = q4_k_m_type(new, stored.shape, n_blocks)
        data = encode(qtype, stored, rng)
        if qtype in ("F32", "F16"):
            w.add_tensor(new, data)
        else:
            w.add_tensor(new, data, raw_dtype=T[qtype])
        types[new] = qtype
        if name is None:
            continue
        ref = decode(qtype, data, stored.shape)
        if qtype == "F32":  # a norm or a bias: the model's own value (Gemma's without the 1)
            ref = x
        refs[name] = ref
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return refs, types


def _write_vocab(w, v: dict) -> None:
    w.add_tokenizer_model(v["model"])
    w.add_tokenizer_pre(v["pre"])
    w.add_token_list(v["tokens"])
    if "scores" in v:
        w.add_token_scores(v["scores"])
    w.add_token_types(v["types"])
    if "merges" in v:
        w.add_token_merges(v["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                     ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id)):
        if v.get(key) is not None:
            add(v[key])
    w.add_add_bos_token(v["add_bos"])
    if v.get("add_space_prefix") is not None:
        w.add_add_space_prefix(v["add_space_prefix"])
    w.add_chat_template(CHAT_TEMPLATE)


def reference_model(src: Path, refs: dict):
    """mlx-lm's own model of the source's type holding the reference weights."""
    from mlx_lm.utils import _get_classes

    cfg = json.loads((src / "config.json").read_text())
    cfg["vocab_size"] = refs["model.embed_tokens.weight"].shape[0]
    model_class, args_class = _get_classes(cfg)
    model = model_class(args_class.from_dict(cfg))
    weights = {k: mx.array(v) for k, v in refs.items()}
    if hasattr(model, "sanitize"):  # (Gemma 3 drops its head layer when the weights have none)
        weights = model.sanitize(weights)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    return model


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def spm_models():
    return {"phi3": train_spm(True, gemma=False), "gemma3": train_spm(False, gemma=True)}


@pytest.fixture(scope="module")
def built(tmp_path_factory, spm_models):
    """Per case: (tiny mlx-lm folder, GGUF path, reference weights, tensor types, vocabulary)."""
    base = tmp_path_factory.mktemp("gguf-arch")
    out = {}
    for i, (case, (arch, kw)) in enumerate(CASES.items()):
        src = make_tiny_model(base / case, MODEL_TYPES[arch], seed=i, **kw)
        vocab_size = json.loads((src / "config.json").read_text())["vocab_size"]
        if arch in ("qwen2", "qwen3"):
            vocab = bpe_vocab()
        else:
            vocab = spm_vocab(spm_models[arch], pad_to=vocab_size if arch == "phi3" else 0,
                              gemma=arch == "gemma3")
        path = base / f"{case}-Q4_K_M.gguf"
        refs, types = write_like_llama_cpp(src, path, arch, vocab, np.random.default_rng(100 + i))
        out[case] = (src, path, refs, types, vocab)
    return out


@pytest.fixture(scope="module")
def opened(built, tmp_path_factory):
    """Each GGUF converted now, into a cache of this module's own (a cache shared with earlier
    runs would hand back what an earlier converter made of the same file)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DUPSTUDIO_HOME", str(tmp_path_factory.mktemp("home")))
        yield {case: open_model(b[1], dtype=mx.float32) for case, b in built.items()}


# ------------------------------------------------------------------ logits


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_mlx_lm_with_the_reference_weights(built, opened, case):
    arch = CASES[case][0]
    src, path, refs, types, vocab = built[case]
    lm = opened[case]
    assert lm.config["model_type"] == MODEL_TYPES[arch]
    assert lm.config["dupstudio_source"]["architecture"] == arch
    assert set(lm.config["dupstudio_source"]["tensor_types"]) == set(types.values())
    assert {"Q4_K", "Q6_K", "Q8_0", "F16", "F32"} <= set(types.values())
    n_vocab = refs["model.embed_tokens.weight"].shape[0]
    ids = mx.array(np.random.default_rng(3).integers(0, n_vocab, (2, 24)))
    got = lm.model(ids)
    want = reference_model(src, refs)(ids)
    assert got.shape == want.shape == (2, 24, n_vocab) and mx.isfinite(got).all().item()
    assert float(mx.abs(want).max()) > 1e-3  # the comparison is not between two zeros
    # The converted weights are the reference's up to float32 rounding (Gemma's norms went
    # through + 1 and - 1) and both run mlx-lm's own model class, so only the last bits of the
    # float32 sums may differ: 1e-4 relative, floored at 1e-4 of the largest logit for logits
    # near zero. A wrong layout (a permuted q/k, a swapped fused half, a norm off by one, a
    # wrong window or rope) moves the logits by orders of magnitude more (see the next test).
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4,
                               atol=1e-4 * float(mx.abs(want).max()))


@pytest.mark.parametrize("case", list(CASES))
def test_dupstudio_runs_the_converted_model(opened, case):
    """dupstudio's own model around the float blocks (its embedding scale, per-window masks,
    head; the matrix list of the architecture) gives the converted mlx-lm model's logits, so
    the converted settings (Gemma's pattern of 6, phi3's partial rotary and long-context
    factors) mean the same to dupstudio as to mlx-lm."""
    from dupstudio.core import adapters
    from dupstudio.core import config as C
    from dupstudio.core.model_io import block_linears, model_shape
    from dupstudio.core.search import hybrid_model

    lm = opened[case]
    arch = adapters.of_model(lm.model)
    assert tuple(block_linears(lm.model)[0]) == arch.matrix_names
    ids = mx.array(np.random.default_rng(5).integers(0, 300, (2, 24)))
    cfg = C.new_config(model_shape(lm.config), group_size=32)
    ours = np.array(hybrid_model(lm, cfg, [])(ids))
    ref = np.array(lm.model(ids))
    assert np.abs(ours - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("case", ["qwen2", "qwen3", "gemma3"])
def test_q_k_rows_are_not_permuted_outside_the_llama_family(built, case):
    """llama.cpp runs these architectures with its rotate-half ("neox") rope, so their converter
    stores q/k rows as Hugging Face has them; un-permuting them as for llama would break the
    model, and the tolerance above would see it."""
    src, _, refs, _, _ = built[case]
    heads = json.loads((src / "config.json").read_text())
    wrong = dict(refs)
    for i in range(heads["num_hidden_layers"]):
        for proj, n in (("q_proj", heads["num_attention_heads"]), ("k_proj", heads["num_key_value_heads"])):
            k = f"model.layers.{i}.self_attn.{proj}.weight"
            wrong[k] = gguf._unpermute_rows(refs[k], n)
    ids = mx.array(np.random.default_rng(4).integers(0, 300, (1, 24)))
    a = np.array(reference_model(src, refs)(ids))
    b = np.array(reference_model(src, wrong)(ids))
    assert np.abs(a - b).max() > 100 * 1e-4 * np.abs(a).max()


def test_converted_configs(opened, built):
    cfg = {case: lm.config for case, lm in opened.items()}
    assert cfg["qwen2"]["tie_word_embeddings"] and not cfg["qwen3"]["tie_word_embeddings"]
    assert cfg["qwen3"]["head_dim"] == 64 and "head_dim" not in cfg["qwen2"]
    g = cfg["gemma3"]
    assert (g["sliding_window"], g["sliding_window_pattern"], g["query_pre_attn_scalar"]) == (8, 6, 80)
    assert g["rope_local_base_freq"] == 10000.0 and g["tie_word_embeddings"]
    assert g["vocab_size"] == len(built["gemma3"][4]["tokens"]) == 360  # the cut embedding
    assert cfg["gemma3-pattern"]["sliding_window_pattern"] == 2
    p = cfg["phi3"]
    assert p["vocab_size"] == 384 and not p["tie_word_embeddings"] and "rope_scaling" not in p
    assert cfg["qwen2-yarn"]["rope_scaling"] == {"type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 2048}
    lr = cfg["phi3-longrope"]
    assert lr["tie_word_embeddings"] and lr["partial_rotary_factor"] == 0.75
    assert lr["original_max_position_embeddings"] == 2048 and lr["max_position_embeddings"] == 8192
    want = CASES["phi3-longrope"][1]["extra"]["rope_scaling"]
    assert lr["rope_scaling"]["type"] == "longrope"
    for key in ("long_factor", "short_factor"):
        np.testing.assert_array_equal(np.float32(lr["rope_scaling"][key]), np.float32(want[key]))
    # the folder is an ordinary mlx-lm folder: config.json names the type and mlx-lm loads it
    assert json.loads((opened["phi3"].path / "config.json").read_text())["architectures"] == ["Phi3ForCausalLM"]


# ------------------------------------------------------------------ tokenizers

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "two  spaces,   three and a tab\there",
    " leading space and trailing ",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and 2024!",
    "unknown letters: café, naïve, ×",
]


@pytest.mark.parametrize("case", ["gemma3", "phi3"])
def test_sentencepiece_tokenizer_encodes_as_sentencepiece(opened, spm_models, case):
    """The rebuilt tokenizer (byte-fallback BPE with merges ranked by piece score) gives
    sentencepiece's own ids, BOS as the file says (Gemma adds one, Phi-3 not), and decodes
    back to the text; mlx-lm recognises it as SentencePiece's for streaming."""
    sp = spm_models[case]
    tok = opened[case].tokenizer
    bos = [sp.bos_id()] if case == "gemma3" else []
    for text in TEXTS:
        assert tok.encode(text) == bos + sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text
        if text.isascii():
            assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    # a user-defined piece splits the text first, and each part is encoded on its own (with its
    # own "▁" prefix where the vocabulary adds one): llama.cpp's rule, and Hugging Face's
    sot = sp.piece_to_id("<start_of_turn>")
    assert tok.encode("<start_of_turn>user said hi") == bos + [sot] + sp.encode("user said hi")
    assert "SPM" in type(tok.detokenizer).__name__
    detok = tok.detokenizer
    for t in sp.encode(TEXTS[0]):
        detok.add_token(t)
    detok.finalize()
    assert detok.text == TEXTS[0]


@pytest.mark.parametrize("case", ["qwen2", "qwen3"])
def test_qwen_tokenizer(opened, case):
    """Byte-level BPE with Qwen's pre-tokenizer: words as the tiny model's own tokenizer splits
    them, digits one by one (Qwen's rule), specials as single tokens, no BOS."""
    tok = opened[case].tokenizer
    own = make_tokenizer()
    for text in TEXTS[:4]:
        assert tok.encode(text) == own.encode(text).ids, text
        assert tok.decode(tok.encode(text)) == text
    digits = tok.encode(" 2024")
    assert [tok.decode([t]) for t in digits] == [" ", "2", "0", "2", "4"]
    assert tok.decode(tok.encode("café ×")) == "café ×"
    ids = tok.encode("<|im_start|>user")
    assert ids[0] == own.token_to_id("<|im_start|>")
    assert "BPE" in type(tok.detokenizer).__name__


# ------------------------------------------------------------------ refusals


def test_unsupported_architecture_is_one_line_naming_it_and_the_supported_ones(tmp_path):
    w = gg.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    w.add_block_count(1)
    w.add_embedding_length(64)
    _write_vocab(w, bpe_vocab())
    w.add_tensor("token_embd.weight", np.zeros((384, 64), np.float32))
    w.add_tensor("blk.0.ssm_in.weight", np.zeros((256, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    p = tmp_path / "mamba.gguf"
    info = gguf.read_gguf_info(p)
    assert info["architecture"] == "mamba" and not info["supported"]
    with pytest.raises(DupstudioError) as e:
        open_model(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and "architecture 'mamba' is not supported" in msg
    assert "(supported: gemma3, llama, mistral, phi3, qwen2, qwen3)" in msg


@pytest.mark.parametrize("change,message", [
    (("gemma3.final_logit_softcapping", 30.0), "final_logit_softcapping is set"),
    (("gemma3.attention.value_length", 40), "value heads of 40 and key heads of 80"),
    (("gemma3.rope.scaling.type", "yarn"), "rope scaling 'yarn' is not supported for gemma3"),
])
def test_settings_mlx_lm_cannot_express_are_refused(built, tmp_path, change, message):
    """A file is re-written with one metadata entry changed; the conversion refuses it in one
    line before reading any tensor."""
    src = built["gemma3"][1]
    reader = gg.GGUFReader(str(src))
    key, value = change
    w = gg.GGUFWriter(str(tmp_path / "changed.gguf"), "gemma3")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", key):
            continue
        vtype = field.types[0]
        if vtype == gg.GGUFValueType.ARRAY:
            w.add_key_value(field.name, field.contents(), vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(field.name, field.contents(), vtype)
    if isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    else:
        w.add_uint32(key, value)
    for t in reader.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(DupstudioError, match=message) as e:
        gguf.plan_conversion(tmp_path / "changed.gguf")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ the command line


def test_cli_info_quant_report_and_eval_on_a_phi3_gguf(built, tmp_path, capsys, monkeypatch):
    from dupstudio.cli import main
    from dupstudio.core.testing import tiny_text

    monkeypatch.setenv("DUPSTUDIO_HOME", str(tmp_path / "home"))  # (converted here, once)
    path = built["phi3"][1]
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    lines = {ln.split("  ")[0]: ln for ln in out.splitlines() if ln}
    assert lines["architecture"].split()[-1] == "phi3" and lines["blocks"].split()[-1] == "3"
    assert "qkv_proj" in out and "gate_up_proj" in out and "untied" in lines["embeddings"]

    assert main(["quant-report", str(path), "--bits", "2", "--group", "64", "--blocks-only"]) == 0
    out = capsys.readouterr().out
    assert "block" in out.lower() and "nan" not in out.lower()

    text = tmp_path / "text.txt"
    text.write_text(tiny_text(4000), encoding="utf-8")
    assert main(["eval", "--model", str(path), "--text", str(text), "--windows", "2",
                 "--ctx", "32", "--batch", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert np.isfinite(res["ppl"]) and res["ppl"] > 1


def test_planning_leaves_the_global_random_key_alone(built):
    """The plan builds mlx-lm's model (lazily) to learn its weights' shapes; the random key its
    layers draw from is left as it was, so what follows does not depend on a conversion."""
    mx.random.seed(7)
    want = mx.random.normal((4,))
    mx.random.seed(7)
    gguf.plan_conversion(built["gemma3"][1])
    assert mx.array_equal(mx.random.normal((4,)), want).item()
