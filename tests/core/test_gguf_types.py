"""GGUF tensor types: dupstudio's numpy decoders (core/gguf_quants.py, used by core/gguf.py)
against the reference decoder of llama.cpp's ``gguf`` Python package.

Files are written with ``gguf.GGUFWriter``. Where the package can quantize a type the data come
from random floats; for the k-quants (which it cannot quantize) they are random valid blocks:
random bytes for every quant and sub-block scale field, small finite fp16 super-block scales.
Every quantized type is also tested with such random blocks, so every bit pattern of the quant
fields is exercised, not only what a quantizer happens to produce.

Why ``rtol=1e-6, atol=1e-6`` rather than exact equality: the conversion promises the float32
dequantized values, i.e. the reference up to float32 rounding. Today both sides do the same
float32 operations in the same order and agree bit for bit, but an equally correct decoder could
group a product differently (Q6_K's ``(d * scale) * q`` vs ``d * (scale * q)``) or use a fused
multiply-add and differ in the last bit. A layout mistake (a wrong nibble, scale or bit) moves a
value by at least one quantization step, orders of magnitude beyond this tolerance.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gg = pytest.importorskip("gguf", reason="the gguf package (llama.cpp's writer and reference "
                                          "decoder) is in the test extra: pip install -e '.[test]'")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T  # noqa: E402
from gguf import quants as gq  # noqa: E402

from dupstudio.core import gguf, gguf_quants  # noqa: E402
from dupstudio.core.jobs import DupstudioError  # noqa: E402

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
         "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
QUANTIZED = TYPES[3:]
#: byte offsets of the fp16 super-block scale fields (d, and dmin / m where the type has one)
FP16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
               "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
#: the largest |sub-block scale x quant| of a type, to size fp16 scales for a given weight range
MAX_PRODUCT = {"Q8_0": 128, "Q4_0": 8, "Q4_1": 15, "Q5_0": 16, "Q5_1": 31, "Q2_K": 45,
               "Q3_K": 128, "Q4_K": 945, "Q5_K": 1953, "Q6_K": 4096}

TOL = dict(rtol=1e-6, atol=1e-6)  # float32 rounding; see the module docstring


def random_blocks(qtype: str, shape, rng, amplitude: float = 1.0) -> np.ndarray:
    """Random valid blocks of ``qtype`` for a tensor of ``shape`` (row-major), as the uint8
    array (rows, bytes per row) GGUFWriter takes: random quant/scale bytes, fp16 scales uniform
    in +-amplitude / MAX_PRODUCT (so the weights stay within about +-amplitude)."""
    block, nbytes = GGML_QUANT_SIZES[T[qtype]]
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    raw = rng.integers(0, 256, (rows, shape[-1] // block * nbytes), dtype=np.uint8)
    blocks = raw.reshape(-1, nbytes)
    for off in FP16_FIELDS[qtype]:
        scale = rng.uniform(-1, 1, len(blocks)) * amplitude / MAX_PRODUCT[qtype]
        blocks[:, off:off + 2] = scale.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(*shape[:-1], -1)


def encode(qtype: str, x: np.ndarray) -> np.ndarray:
    """``x`` in ``qtype`` as GGUFWriter takes it (float arrays for F32/F16, bytes otherwise)."""
    if qtype == "F32":
        return x.astype(np.float32)
    if qtype == "F16":
        return x.astype(np.float16)
    return gq.quantize(x.astype(np.float32), T[qtype])


def can_quantize(qtype: str) -> bool:
    try:
        gq.quantize(np.zeros((1, 256), np.float32), T[qtype])
        return True
    except NotImplementedError:
        return False


def reference(qtype: str, data: np.ndarray, shape) -> np.ndarray:
    out = gq.dequantize(data, T[qtype]).astype(np.float32, copy=False).reshape(shape)
    assert np.isfinite(out).all()
    return out


def write(path: Path, tensors, arch: str = "llama", meta=None) -> Path:
    """tensors: [(name, qtype, data)] with data as :func:`encode` / :func:`random_blocks` give."""
    w = gg.GGUFWriter(str(path), arch)
    for key, (kind, value, *sub) in (meta or {}).items():
        w.add_key_value(key, value, kind, sub_type=sub[0] if sub else None)
    for name, qtype, data in tensors:
        if qtype in ("F32", "F16"):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=T[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_all(path: Path) -> dict:
    return {info["name"]: (info, arr) for info, arr in gguf.iter_gguf_tensors(path)}


# ------------------------------------------------------------------ one file per type


def test_supported_types_and_layouts_match_ggml():
    assert list(gguf_quants.SUPPORTED_TYPES) == TYPES
    for t in TYPES:
        assert gguf_quants.block_layout(t) == GGML_QUANT_SIZES[T[t]]
        ttype_id = int(T[t])
        assert gguf.GGML_TYPES[ttype_id][0] == t and gguf.GGML_TYPES[ttype_id][1:] == GGML_QUANT_SIZES[T[t]]


@pytest.mark.parametrize("qtype", TYPES)
def test_type_matches_reference(tmp_path, qtype):
    rng = np.random.default_rng(sum(map(ord, qtype)))
    tensors, refs = [], {}
    shapes = {"mat": (6, 512), "vec": (256,), "tall": (40, 768)}
    for name, shape in shapes.items():
        # from floats where the package can quantize this type, random valid blocks otherwise
        if qtype in ("F32", "F16", "BF16") or can_quantize(qtype):
            data = encode(qtype, 0.1 * rng.standard_normal(shape))
        else:
            data = random_blocks(qtype, shape, rng)
        tensors.append((name, qtype, data))
        refs[name] = reference(qtype, data, shape)
    if qtype in ("F32", "F16", "BF16"):  # the type's whole range (float16 rounding would show)
        top = 4.8 if qtype == "F16" else 30
        wide = rng.choice([-1, 1], (4, 256)) * 10.0 ** rng.uniform(-top - 2, top, (4, 256))
        tensors.append(("wide", qtype, encode(qtype, wide)))
        refs["wide"] = reference(qtype, tensors[-1][2], (4, 256))
    if qtype in QUANTIZED:  # every bit pattern of the quant fields, whatever the quantizer emits
        data = random_blocks(qtype, (5, 1024), rng)
        tensors.append(("random", qtype, data))
        refs["random"] = reference(qtype, data, (5, 1024))
    path = write(tmp_path / f"{qtype}.gguf", tensors)
    got = read_all(path)
    assert set(got) == set(refs)
    for name, ref in refs.items():
        info, arr = got[name]
        assert info["type"] == qtype and arr.dtype == np.float32 and arr.shape == ref.shape
        np.testing.assert_allclose(arr, ref, **TOL, err_msg=f"{qtype} {name}")


def test_all_types_in_one_file_with_small_chunks(tmp_path, monkeypatch):
    """Mixed types in one file (offsets of differently sized blocks), decoded in chunks of two
    k-quant blocks, so a tensor spans many chunks and a chunk boundary falls mid-row."""
    monkeypatch.setattr(gguf_quants, "CHUNK_ELEMENTS", 512)
    rng = np.random.default_rng(7)
    tensors, refs = [], {}
    for i, qtype in enumerate(TYPES[::-1] + TYPES):
        shape = (3, 768) if i % 2 else (7, 256)
        data = random_blocks(qtype, shape, rng) if qtype in QUANTIZED else \
            encode(qtype, rng.standard_normal(shape))
        tensors.append((f"t{i}.{qtype}", qtype, data))
        refs[f"t{i}.{qtype}"] = reference(qtype, data, shape)
    got = read_all(write(tmp_path / "mixed.gguf", tensors))
    assert list(got) == [n for n, _, _ in tensors]
    for name, ref in refs.items():
        np.testing.assert_allclose(got[name][1], ref, **TOL, err_msg=name)


def test_dequantize_bytes_and_bad_sizes():
    rng = np.random.default_rng(3)
    raw = random_blocks("Q4_K", (2, 256), rng)
    np.testing.assert_allclose(gguf_quants.dequantize(raw.tobytes(), "Q4_K", (2, 256)),
                               reference("Q4_K", raw, (2, 256)), **TOL)
    with pytest.raises(DupstudioError, match=r"'w' \(Q4_K\): 100 bytes are not a whole number of 144-byte"):
        gguf_quants.dequantize(bytes(100), "Q4_K", tensor="w")


# ------------------------------------------------------------------ refused types


def test_unsupported_types_are_refused_by_name(tmp_path):
    rng = np.random.default_rng(5)
    tensors = [("token_embd.weight", "F32", np.zeros((4, 256), np.float32))]
    for name, qtype in (("blk.0.attn_q.weight", "IQ2_XXS"), ("blk.0.attn_k.weight", "TQ1_0"),
                        ("blk.0.attn_v.weight", "IQ2_XXS")):
        _, nbytes = GGML_QUANT_SIZES[T[qtype]]
        tensors.append((name, qtype, rng.integers(0, 256, (2, nbytes), dtype=np.uint8)))
    p = write(tmp_path / "iq.gguf", tensors)
    supported = "supported: " + ", ".join(TYPES)
    info = gguf.read_gguf_info(p)
    assert not info["supported"] and info["quant_types"] == ["F32", "IQ2_XXS", "TQ1_0"]
    assert (f"tensor 'blk.0.attn_q.weight' has type IQ2_XXS, which dupstudio cannot decode "
            f"({supported})") in info["problems"]
    assert any(pr.startswith("tensor 'blk.0.attn_k.weight' has type TQ1_0") for pr in info["problems"])
    with pytest.raises(DupstudioError) as e:
        gguf.convert_gguf(p, tmp_path / "out")
    msg = str(e.value)
    assert str(p) in msg and "'blk.0.attn_q.weight' has type IQ2_XXS" in msg and supported in msg
    assert "\n" not in msg and not (tmp_path / "out").exists()
    # the reader itself refuses too, at the first such tensor
    with pytest.raises(DupstudioError, match=r"'blk.0.attn_q.weight' has type IQ2_XXS, which "
                                             r"dupstudio cannot decode \(supported: F32, F16"):
        read_all(p)
    with pytest.raises(DupstudioError, match=r"tensor 'x' has type TQ1_0"):
        gguf_quants.dequantize(bytes(54), "TQ1_0", tensor="x")


# ------------------------------------------------------------------ a mixed-type llama model

HIDDEN, HEADS, KV_HEADS, INTER, LAYERS = 256, 4, 2, 512, 2
#: a Q4_K_M-like layer 0 (Q4_K matrices, Q6_K for attn_v and ffn_down, F32 norms) and a layer 1
#: that uses every other type, so one model holds all thirteen
LAYER_TYPES = [
    {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K",
     "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K", "attn_norm": "F32", "ffn_norm": "F32"},
    {"attn_q": "Q5_K", "attn_k": "Q3_K", "attn_v": "Q5_0", "attn_output": "Q2_K",
     "ffn_gate": "Q4_0", "ffn_up": "Q4_1", "ffn_down": "Q5_1", "attn_norm": "F16", "ffn_norm": "BF16"},
]
GLOBAL_TYPES = {"token_embd": "Q6_K", "output": "Q8_0", "output_norm": "F32"}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of Q/K rows (HF -> GGUF)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _undo_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF -> HF rows, built from the forward permutation (independent of dupstudio's inverse)."""
    perm = _llama_cpp_permute(np.arange(w.shape[0]), n_head)
    out = np.empty_like(w)
    out[perm] = w
    return out


def _write_mixed_llama(path: Path, rng) -> dict:
    """A tiny llama GGUF in mixed types; returns {HF name: reference float32 weight}."""
    from dupstudio.core.testing import GGUF_ARRAY, GGUF_F32, GGUF_STRING, GGUF_U32, tiny_gguf_parts

    V = gg.GGUFValueType
    kinds = {GGUF_STRING: V.STRING, GGUF_U32: V.UINT32, GGUF_F32: V.FLOAT32}
    kvs, floats = tiny_gguf_parts(layers=LAYERS, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS,
                                  intermediate=INTER)
    meta = {}
    for key, kind, value in kvs:
        if key == "general.architecture":
            continue  # GGUFWriter writes it
        if kind == GGUF_ARRAY:
            etype, items = value
            meta[key] = (V.ARRAY, items, kinds[etype])
        else:
            meta[key] = (kinds[kind], value)
    floats = dict(floats)
    floats["output.weight"] = 0.05 * rng.standard_normal(floats["token_embd.weight"].shape)
    tensors, refs = [], {}
    for name, x in floats.items():
        parts = name.split(".")
        stem = parts[2] if parts[0] == "blk" else parts[0]
        qtype = LAYER_TYPES[int(parts[1])][stem] if parts[0] == "blk" else GLOBAL_TYPES[stem]
        if qtype in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
            data = random_blocks(qtype, x.shape, rng, amplitude=2.0 / x.shape[-1] ** 0.5)
        else:
            data = encode(qtype, np.asarray(x))
        tensors.append((name, qtype, data))
        ref = reference(qtype, data, x.shape)
        if stem == "attn_q":
            ref = _undo_permute(ref, HEADS)
        elif stem == "attn_k":
            ref = _undo_permute(ref, KV_HEADS)
        refs[gguf._hf_name(name)] = ref
    write(path, tensors, meta=meta)
    return refs


def test_mixed_type_llama_opens_and_matches_reference_logits(tmp_path, monkeypatch):
    import mlx.core as mx
    from mlx_lm.models import llama

    from dupstudio.core.model_io import open_model

    monkeypatch.setenv("DUPSTUDIO_HOME", str(tmp_path / "home"))
    rng = np.random.default_rng(11)
    p = tmp_path / "tiny-Q4_K_M.gguf"
    refs = _write_mixed_llama(p, rng)
    info = gguf.read_gguf_info(p)
    assert info["supported"] and info["quant_types"] == sorted(TYPES)

    loaded = open_model(p, dtype=mx.float32)
    assert loaded.config["dupstudio_source"]["tensor_types"] == sorted(TYPES)
    ids = mx.array([loaded.tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    got = loaded.model(ids)

    args = llama.ModelArgs(model_type="llama", hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                           intermediate_size=INTER, num_attention_heads=HEADS,
                           num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS, rms_norm_eps=1e-5,
                           vocab_size=refs["model.embed_tokens.weight"].shape[0], rope_theta=10000.0,
                           tie_word_embeddings=False)
    ref_model = llama.Model(args)
    ref_model.load_weights([(k, mx.array(v)) for k, v in refs.items()], strict=True)
    want = ref_model(ids)
    assert got.shape == want.shape and mx.isfinite(got).all().item()
    assert float(mx.abs(want).max()) > 1e-3  # the comparison is not between two zeros
    # the same float32 weights through the same model: equal up to the order of float32 sums;
    # 1e-4 relative, with a floor of 1e-4 of the largest logit for the logits that are near zero
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4,
                               atol=1e-4 * float(mx.abs(want).max()))
