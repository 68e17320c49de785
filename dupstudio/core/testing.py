"""Tiny random-initialised llama models written as real mlx-lm folders (tests, self-test,
benchmarks). Built in code: nothing is downloaded."""
from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Quantization maps weights to a few levels; "
    "two bits give four levels per group. A decoder block has attention and a gated MLP. "
    "Paris is the capital of France. Numbers 0 1 2 3 4 5 6 7 8 9 appear too.\n"
) * 20


def make_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    return tok


def tiny_config(vocab_size: int, *, hidden: int = 256, layers: int = 3, intermediate: int = 512,
                heads: int = 4, kv_heads: int = 2, tied: bool = True) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "bos_token_id": 0,
        "eos_token_id": 2,
    }


#: the model types :func:`make_tiny_model` writes (every architecture dupstudio supports)
TINY_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")


def tiny_arch_config(model_type: str, vocab_size: int, *, hidden: int = 256, layers: int = 3,
                     intermediate: int = 512, heads: int = 4, kv_heads: int = 2,
                     tied=None) -> dict:
    """config.json of a tiny ``model_type`` model (llama's: :func:`tiny_config`). ``tied``
    None: the architecture's usual choice for a small model (phi3 and qwen3 untied, Gemma 3
    tied, the others tied). Gemma 3 gets a sliding window of 8 tokens on every other layer, so
    that windows shorter than the inputs are exercised."""
    if tied is None:
        tied = model_type not in ("phi3", "qwen3")
    cfg = tiny_config(vocab_size, hidden=hidden, layers=layers, intermediate=intermediate,
                      heads=heads, kv_heads=kv_heads, tied=tied)
    cfg["model_type"] = model_type
    if model_type in ("qwen2", "phi3"):
        del cfg["head_dim"]  # (both use hidden / heads)
    if model_type == "gemma3_text":
        cfg.update(query_pre_attn_scalar=hidden // heads, sliding_window=8,
                   sliding_window_pattern=2, rope_local_base_freq=10000.0, rms_norm_eps=1e-6)
    if model_type == "phi3":
        # (pad_token_id: transformers' phi3 default, 32000, lies outside a tiny vocabulary)
        cfg.update(original_max_position_embeddings=2048, pad_token_id=0)
    return cfg


def make_tiny_llama(path: str | Path, *, seed: int = 0, layers: int = 3, hidden: int = 256,
                    intermediate: int = 512, tied: bool = True) -> Path:
    """Write a random-initialised llama (mlx-lm folder with a real BPE tokenizer) to ``path``."""
    return make_tiny_model(path, "llama", seed=seed, layers=layers, hidden=hidden,
                           intermediate=intermediate, tied=tied)


def make_tiny_model(path: str | Path, model_type: str = "llama", *, seed: int = 0, layers: int = 3,
                    hidden=None, intermediate: int = 512, tied=None, extra=None) -> Path:
    """Write a random-initialised ``model_type`` model (mlx-lm folder: config.json,
    model.safetensors and a real BPE tokenizer) to ``path``, built from mlx-lm's own model
    class of that architecture. ``hidden`` None: 256, but 320 for Gemma 3, whose embedding
    scale √hidden then is not a power of two (so its bfloat16 rounding matters). ``extra``:
    config.json entries to add (e.g. llama's ``layer_types`` and ``sliding_window``)."""
    if hidden is None:
        hidden = 320 if model_type == "gemma3_text" else 256
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    vocab = tok.get_vocab_size()
    if model_type == "llama":
        cfg = tiny_config(vocab, hidden=hidden, layers=layers, intermediate=intermediate,
                          tied=True if tied is None else tied)
    else:
        cfg = tiny_arch_config(model_type, vocab, hidden=hidden, layers=layers,
                               intermediate=intermediate, tied=tied)
    cfg.update(extra or {})
    model_class, args_class = _get_classes(cfg)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(cfg))
    # Give the random model some structure: scaled-down init so activations stay sane,
    # non-trivial norm weights (Gemma's norms multiply by 1 + weight).
    offset = 0.0 if model_type == "gemma3_text" else 1.0
    params = dict(tree_flatten(model.parameters()))
    for k, v in params.items():
        if k.endswith("norm.weight"):
            params[k] = offset + 0.1 * mx.random.normal(v.shape)
        elif k.endswith("embed_tokens.weight"):
            params[k] = 0.05 * mx.random.normal(v.shape)
        elif v.ndim == 2:
            params[k] = mx.random.normal(v.shape) * (1.0 / v.shape[1] ** 0.5)
        elif k.endswith(".bias"):
            params[k] = 0.05 * mx.random.normal(v.shape)
    if cfg["tie_word_embeddings"]:
        params.pop("lm_head.weight", None)  # (Gemma 3 ties exactly when there is none)
    params = {k: v.astype(mx.float32) for k, v in params.items()}
    mx.eval(params)
    mx.save_safetensors(str(path / "model.safetensors"), params, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE, "add_bos_token": False,
        "model_max_length": 2048,
    }, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, indent=2))
    return path


def tiny_text(n_chars: int = 20000, seed: int = 0) -> str:
    """Pseudo-random English-like text built from the tiny tokenizer's corpus words."""
    import random

    words = _CORPUS.replace("\n", " ").split()
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        w = rng.choice(words)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)


def free_port_block(n: int = 4) -> int:
    """A localhost port whose next ``n`` ports are in range (first ring port for mlx.launch tests)."""
    import socket

    for _ in range(20):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + n < 65535:
            return port
    return 40000


# --------------------------------------------------------------------------- tiny GGUF files
# A minimal GGUF v3 writer (F32 tensors only) for tests of the converter and its checks.
GGUF_U32, GGUF_F32, GGUF_STRING, GGUF_ARRAY = 4, 6, 8, 9


def _gguf_str(text: str) -> bytes:
    import struct

    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_value(vtype: int, value) -> bytes:
    """Encode one metadata value; arrays are ``(element type, [values])``."""
    import struct

    if vtype == GGUF_STRING:
        return _gguf_str(value)
    if vtype == GGUF_ARRAY:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(gguf_value(etype, v) for v in items)
    return struct.pack({GGUF_U32: "<I", GGUF_F32: "<f"}[vtype], value)


def gguf_bytes(kvs: list, tensors: list, alignment: int = 32) -> bytes:
    """A GGUF v3 file: ``kvs`` = [(key, value type, value)], ``tensors`` = [(name, float32 array)]."""
    import struct

    import numpy as np

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    out += b"".join(_gguf_str(k) + struct.pack("<I", t) + gguf_value(t, v) for k, t, v in kvs)
    blobs, off = b"", 0
    for name, arr in tensors:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        dims = list(reversed(arr.shape))
        out += _gguf_str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", 0, off)
        raw = arr.tobytes() + b"\0" * ((-arr.nbytes) % alignment)
        blobs += raw
        off += len(raw)
    out += b"\0" * ((-len(out)) % alignment)
    return out + blobs


def tiny_gguf_parts(*, layers: int = 1, hidden: int = 64, heads: int = 2, kv_heads: int = 1,
                    intermediate: int = 128, seed: int = 0) -> tuple:
    """(kvs, tensors) of a tiny convertible llama GGUF with a real byte-level BPE vocabulary."""
    import numpy as np

    tok = make_tokenizer()
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in SPECIALS else 1 for t in vocab]
    kvs = [("general.architecture", GGUF_STRING, "llama"), ("general.name", GGUF_STRING, "tiny"),
           ("llama.block_count", GGUF_U32, layers), ("llama.embedding_length", GGUF_U32, hidden),
           ("llama.feed_forward_length", GGUF_U32, intermediate),
           ("llama.attention.head_count", GGUF_U32, heads),
           ("llama.attention.head_count_kv", GGUF_U32, kv_heads),
           ("llama.context_length", GGUF_U32, 256),
           ("llama.attention.layer_norm_rms_epsilon", GGUF_F32, 1e-5),
           ("tokenizer.ggml.model", GGUF_STRING, "gpt2"),
           ("tokenizer.ggml.tokens", GGUF_ARRAY, (GGUF_STRING, vocab)),
           ("tokenizer.ggml.merges", GGUF_ARRAY, (GGUF_STRING, merges)),
           ("tokenizer.ggml.token_type", GGUF_ARRAY, (GGUF_U32, types)),
           ("tokenizer.ggml.eos_token_id", GGUF_U32, vocab.index("<|im_end|>"))]
    rng = np.random.default_rng(seed)
    hd = hidden // heads
    mats = {"attn_q": (heads * hd, hidden), "attn_k": (kv_heads * hd, hidden),
            "attn_v": (kv_heads * hd, hidden), "attn_output": (hidden, heads * hd),
            "ffn_gate": (intermediate, hidden), "ffn_up": (intermediate, hidden),
            "ffn_down": (hidden, intermediate)}
    tensors = [("token_embd.weight", 0.05 * rng.standard_normal((len(vocab), hidden))),
               ("output_norm.weight", np.ones(hidden))]
    for k in range(layers):
        tensors += [(f"blk.{k}.attn_norm.weight", np.ones(hidden)), (f"blk.{k}.ffn_norm.weight", np.ones(hidden))]
        tensors += [(f"blk.{k}.{m}.weight", rng.standard_normal(s) / s[1] ** 0.5) for m, s in mats.items()]
    return kvs, tensors


def write_tiny_gguf(path: str | Path, *, meta: dict | None = None, **shape) -> Path:
    """Write a tiny convertible llama GGUF; ``meta`` replaces metadata values by key
    (``{key: (value type, value)}``; new keys are appended)."""
    kvs, tensors = tiny_gguf_parts(**shape)
    meta = dict(meta or {})
    kvs = [(k, *meta.pop(k)) if k in meta else (k, t, v) for k, t, v in kvs]
    kvs += [(k, t, v) for k, (t, v) in meta.items()]
    path = Path(path)
    path.write_bytes(gguf_bytes(kvs, tensors))
    return path
