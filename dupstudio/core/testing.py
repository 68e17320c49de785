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


def make_tiny_llama(path: str | Path, *, seed: int = 0, layers: int = 3, hidden: int = 256,
                    intermediate: int = 512, tied: bool = True) -> Path:
    """Write a random-initialised llama (mlx-lm folder with a real BPE tokenizer) to ``path``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    vocab = tok.get_vocab_size()
    cfg = tiny_config(vocab, hidden=hidden, layers=layers, intermediate=intermediate, tied=tied)
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    # Give the random model some structure: scaled-down init so activations stay sane,
    # non-trivial norm weights.
    params = dict(tree_flatten(model.parameters()))
    for k, v in params.items():
        if k.endswith("norm.weight"):
            params[k] = 1.0 + 0.1 * mx.random.normal(v.shape)
        elif k.endswith("embed_tokens.weight"):
            params[k] = 0.05 * mx.random.normal(v.shape)
        elif v.ndim == 2:
            params[k] = mx.random.normal(v.shape) * (1.0 / v.shape[1] ** 0.5)
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
