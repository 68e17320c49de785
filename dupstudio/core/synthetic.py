"""A llama-family mlx-lm folder of any size with random weights (memory benchmarks of
streamed vs in-memory evaluation). Written block by block into safetensors shards so that
writing a 1.5B model needs only about one shard in memory."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model")


def synthetic_shape(params: float, vocab: int) -> dict:
    """Hidden size, blocks and MLP width giving about ``params`` parameters (tied embedding)."""
    hidden = 2048 if params >= 1e9 else 1024 if params >= 1.5e8 else 512 if params >= 3e7 else 256
    inter = int(round(8 * hidden / 3 / 64)) * 64
    per_block = 4 * hidden * hidden + 3 * hidden * inter
    layers = max(1, int(round((params - vocab * hidden) / per_block)))
    heads = hidden // 64
    return {"hidden": hidden, "intermediate": inter, "layers": layers, "heads": heads,
            "kv_heads": heads, "per_block": per_block,
            "params": layers * per_block + vocab * hidden}


def _tokenizer_source() -> Optional[Path]:
    """The converted default model folder if it can be had (converting it once if needed)."""
    try:
        from dupstudio.core.model_io import resolve_model_dir

        p = resolve_model_dir(None)
        return p if (p / "tokenizer.json").exists() else None
    except Exception:
        return None


def write_synthetic_llama(path: str | Path, params: float = 1.5e9, *, seed: int = 0,
                          dtype: str = "float16", shard_bytes: int = 1 << 30,
                          tokenizer_from: Optional[str | Path] = "default") -> Path:
    """Write a random llama with about ``params`` parameters to ``path``. The tokenizer is the
    default model's when available (``tokenizer_from="default"``), a given folder's, or the
    tiny test tokenizer. Returns ``path``."""
    import mlx.core as mx

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    src = _tokenizer_source() if tokenizer_from == "default" else (
        Path(tokenizer_from) if tokenizer_from else None)
    if src is not None and (src / "tokenizer.json").exists():
        for f in TOKENIZER_FILES:
            if (src / f).exists():
                shutil.copy(src / f, path / f)
        vocab = int(json.loads((src / "config.json").read_text())["vocab_size"]) \
            if (src / "config.json").exists() else None
        if vocab is None:
            from tokenizers import Tokenizer

            vocab = Tokenizer.from_file(str(src / "tokenizer.json")).get_vocab_size()
    else:
        from dupstudio.core.testing import make_tiny_llama

        tmp = path / ".tiny"
        make_tiny_llama(tmp, layers=1)
        for f in TOKENIZER_FILES:
            if (tmp / f).exists():
                shutil.copy(tmp / f, path / f)
        vocab = int(json.loads((tmp / "config.json").read_text())["vocab_size"])
        shutil.rmtree(tmp, ignore_errors=True)
    shp = synthetic_shape(params, vocab)
    H, I, L = shp["hidden"], shp["intermediate"], shp["layers"]
    from dupstudio.core.testing import tiny_config

    cfg = tiny_config(vocab, hidden=H, layers=L, intermediate=I, heads=shp["heads"],
                      kv_heads=shp["kv_heads"], tied=True)
    cfg["torch_dtype"] = dtype
    rng = np.random.default_rng(seed)
    npdt = np.float16 if dtype == "float16" else np.float32

    def mat(out, inn):
        return (rng.standard_normal((out, inn), dtype=np.float32) * (inn ** -0.5)).astype(npdt)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(H, dtype=np.float32)).astype(npdt)

    for old in path.glob("model*.safetensors"):
        old.unlink()
    shards, cur, cur_bytes = [], {}, 0

    def flush():
        nonlocal cur, cur_bytes
        if cur:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            mx.save_safetensors(str(path / name), {k: mx.array(v) for k, v in cur.items()},
                                metadata={"format": "mlx"})
            shards.append((name, list(cur)))
            cur, cur_bytes = {}, 0

    def add(name, arr):
        nonlocal cur_bytes
        cur[name] = arr
        cur_bytes += arr.nbytes
        if cur_bytes >= shard_bytes:
            flush()

    add("model.embed_tokens.weight",
        (0.05 * rng.standard_normal((vocab, H), dtype=np.float32)).astype(npdt))
    for k in range(L):
        p = f"model.layers.{k}."
        for m, (o, i) in {"self_attn.q_proj": (H, H), "self_attn.k_proj": (H, H),
                          "self_attn.v_proj": (H, H), "self_attn.o_proj": (H, H),
                          "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H),
                          "mlp.down_proj": (H, I)}.items():
            add(p + m + ".weight", mat(o, i))
        add(p + "input_layernorm.weight", norm())
        add(p + "post_attention_layernorm.weight", norm())
    add("model.norm.weight", norm())
    flush()
    n = len(shards)
    weight_map = {}
    for j, (name, keys) in enumerate(shards):
        final = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
        (path / name).rename(path / final)
        weight_map.update({k: final for k in keys})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_parameters": shp["params"]}, "weight_map": weight_map}, indent=1))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path
