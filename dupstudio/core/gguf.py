"""Convert a GGUF file (llama, mistral, qwen2, qwen3, gemma3 or phi3) into an mlx-lm model directory.

The GGUF tensors are read one at a time from the byte offsets in the header and decoded with
numpy (:mod:`dupstudio.core.gguf_quants`: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the
k-quants Q2_K-Q6_K, mixed freely within a file), then stored, un-rounded, as float32
safetensors under the names of mlx-lm's model of the matching type (``llama``, ``qwen2``,
``qwen3``, ``gemma3_text``, ``phi3``). ``mlx.core.load`` is not used: it refuses
Q5_0/Q5_1/Q3_K/Q5_K, rounds BF16/Q2_K/Q6_K to float16 and misreads Q4_K.

What llama.cpp's ``convert_hf_to_gguf.py`` does to the Hugging Face weights is undone here, per
architecture (the table :data:`_ARCHS`):

* llama/mistral: the rows of ``attn_q``/``attn_k`` are permuted for llama.cpp's adjacent-pair
  ("normal") rope; they are permuted back to the rotate-half layout mlx-lm's ``llama`` expects.
  qwen2, qwen3, gemma3 and phi3 run llama.cpp's "neox" rope, which is rotate-half already, so
  their converter stores the rows as they are and nothing is undone;
* gemma3: Gemma's norms compute ``x̂·(1 + w)``; the converter stores ``1 + w`` (every tensor whose
  name ends in ``norm.weight``), so 1 is subtracted again for mlx-lm's ``gemma3_text``, which adds
  it itself. The converter also cuts the embedding to the tokenizer's vocabulary (the config's
  vocabulary follows the file);
* phi3: ``attn_qkv`` and ``ffn_up`` hold Hugging Face's fused ``qkv_proj`` and ``gate_up_proj``
  unchanged; long-context factors (``rope_factors_long``/``_short``) go back into config.json.

A missing ``output.weight`` means a tied head. Hyper-parameters come from the ``<arch>.*`` keys;
where llama.cpp assumes a value the file does not hold (Gemma 3's sliding-window pattern of 6,
its local rope base of 10000, its attention scale), the same value is assumed here. The expected
tensors and shapes are those of mlx-lm's model built (lazily, nothing is allocated) from the
config, so a converted folder always loads.

The tokenizer is rebuilt from the GGUF vocabulary as a ``tokenizers`` tokenizer.json plus the
usual Hugging Face side files: byte-level BPE (``tokenizer.ggml.model == "gpt2"``, with its
merges) or SentencePiece (``"llama"``: pieces and scores, rebuilt as a byte-fallback BPE whose
merges are ranked by the merged piece's score, which is how SentencePiece's BPE picks them).

The conversion is written into a hidden temporary sibling of the output folder and renamed into
place at the end; the marker ``dupstudio-complete.json`` (file list, sizes, source sha256) is the
last file written, so :func:`is_complete_conversion` can validate a cached conversion.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from .gguf_quants import SUPPORTED_TYPES, read_tensor, unsupported_message
from .jobs import CancelToken, DupstudioError, ProgressFn, ensure
from .safeio import atomic_write_bytes, make_temp_dir, remove_stale, temp_sibling, user_io

__all__ = [
    "MARKER_NAME",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TYPES",
    "convert_gguf",
    "is_complete_conversion",
    "iter_gguf_tensors",
    "plan_conversion",
    "read_gguf_info",
    "sha256_file",
]

MARKER_NAME = "dupstudio-complete.json"
MARKER_FORMAT = 1
WEIGHTS_NAME = "model.safetensors"

#: ``general.architecture`` values the converter maps onto an mlx-lm model (see :data:`_ARCHS`).
SUPPORTED_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"})

PathLike = Union[str, "os.PathLike[str]"]

# --------------------------------------------------------------------------------------------
# GGUF header parsing (pure Python, no tensor data is read)
# --------------------------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32

# ggml tensor type id -> (name, elements per block, bytes per block)
GGML_TYPES: Dict[int, Tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

#: Tensor types the converter decodes (see :mod:`dupstudio.core.gguf_quants`); the other
#: types above are recognised in headers (so ``read_gguf_info`` can describe the file) but refused.
DECODABLE_TYPES = frozenset(SUPPORTED_TYPES)

# GGUF metadata value types
_GGUF_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
    10: "<Q", 11: "<q", 12: "<d",
}
_GGUF_STRING = 8
_GGUF_ARRAY = 9
#: GGUF allows arrays of arrays; real files nest at most once (parsing is recursive)
MAX_ARRAY_DEPTH = 4
#: sane limits on the hyper-parameters of a convertible model (checked before anything is built)
MAX_BLOCKS = 4096
_HPARAM_LIMITS = {
    "block_count": MAX_BLOCKS,
    "embedding_length": 1 << 20,
    "feed_forward_length": 1 << 22,
    "attention.head_count": 4096,
    "attention.head_count_kv": 4096,
    "attention.key_length": 4096,
    "attention.value_length": 4096,
    "attention.sliding_window": 1 << 24,
    "attention.sliding_window_pattern": MAX_BLOCKS,
    "rope.dimension_count": 4096,
    "rope.scaling.original_context_length": 1 << 24,
    "vocab_size": 1 << 24,
    "context_length": 1 << 24,
}


class _Reader:
    """Sequential little-endian reader over a file, raising DupstudioError on truncation."""

    def __init__(self, fh, path: Path, size: int):
        self._fh = fh
        self._path = path
        self._size = size
        self._buf = b""
        self._buf_start = 0  # file offset of _buf[0]
        self._pos = 0  # offset within _buf

    @property
    def offset(self) -> int:
        return self._buf_start + self._pos

    def _need(self, n: int) -> None:
        if self._pos + n <= len(self._buf):
            return
        rest = self._buf[self._pos:]
        self._buf_start += self._pos
        chunk = self._fh.read(max(n - len(rest), 1 << 20))
        self._buf = rest + chunk
        self._pos = 0
        if len(self._buf) < n:
            raise DupstudioError(
                f"{self._path}: the GGUF header is truncated (needs more than the file's "
                f"{self._size} bytes); the file is incomplete or damaged"
            )

    def read(self, n: int) -> bytes:
        self._need(n)
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out

    def scalar(self, fmt: str):
        n = struct.calcsize(fmt)
        self._need(n)
        (v,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += n
        return v

    @property
    def remaining(self) -> int:
        return self._size - self.offset

    def _corrupt(self, what: str) -> DupstudioError:
        return DupstudioError(f"{self._path}: corrupt GGUF header ({what} at byte {self.offset})")

    def count(self, what: str, min_item_bytes: int) -> int:
        """A length field, checked against what the rest of the file can hold."""
        n = self.scalar("<Q")
        if n * min_item_bytes > self.remaining:
            raise DupstudioError(f"{self._path}: the GGUF header is truncated or corrupt ({what} of "
                                 f"{n} items at byte {self.offset}, only {self.remaining} bytes left)")
        return n

    def string(self) -> str:
        raw = self.read(self.count("string", 1))
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, skip_arrays: bool = False, depth: int = 0):
        if vtype in _GGUF_SCALARS:
            return self.scalar(_GGUF_SCALARS[vtype])
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype == _GGUF_ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise self._corrupt(f"arrays nested deeper than {MAX_ARRAY_DEPTH}")
            etype = self.scalar("<I")
            if etype in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[etype]
                count = self.count("array", struct.calcsize(fmt))
                raw = self.read(struct.calcsize(fmt) * count)
                if skip_arrays:
                    return _SkippedArray(etype, count)
                return list(struct.unpack(f"<{count}{fmt[1:]}", raw))
            # a string is at least its 8-byte length, an array its 12-byte type and count
            count = self.count("array", 8 if etype == _GGUF_STRING else 12)
            out = [self.value(etype, skip_arrays, depth + 1) for _ in range(count)]
            return _SkippedArray(etype, count) if skip_arrays else out
        raise self._corrupt(f"unknown value type {vtype}")


class _SkippedArray:
    def __init__(self, etype: int, count: int):
        self.etype = etype
        self.count = count

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"<array of {self.count}>"


def _parse_gguf_header(path: Path, *, skip_arrays: bool = True) -> Dict[str, Any]:
    """Parse the GGUF header: metadata (arrays skipped unless asked) and tensor infos.

    Checks the magic, the version, that every tensor type is known and that the tensor data
    section lies inside the file (a truncated download is reported here, before any tensor is read).
    """
    path = Path(path)
    if not path.exists():
        raise DupstudioError(f"{path}: no such file")
    if not path.is_file():
        raise DupstudioError(f"{path}: not a file")
    size = path.stat().st_size
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DupstudioError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    with fh:
        magic = fh.read(4)
        if magic != GGUF_MAGIC:
            raise DupstudioError(
                f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file starts with b'GGUF')"
            )
        r = _Reader(fh, path, size)
        r._buf_start = 4
        version = r.scalar("<I")
        if version not in (2, 3):
            raise DupstudioError(f"{path}: GGUF version {version} is not supported (only 2 and 3)")
        # each key-value pair takes at least 13 bytes, each tensor info at least 24
        n_tensors = r.count("tensor count", 24)
        n_kv = r.count("metadata count", 13)
        metadata: Dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            vtype = r.scalar("<I")
            metadata[key] = r.value(vtype, skip_arrays=skip_arrays)
        tensors = [_tensor_info(r, path) for _ in range(n_tensors)]
        header_end = r.offset
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or not 0 < alignment <= 1 << 16 or alignment & (alignment - 1):
        raise DupstudioError(f"{path}: corrupt GGUF header (general.alignment {alignment!r} is not "
                             f"a power of two up to 65536)")
    _check_tensor_layout(tensors, alignment, path)
    data_start = (header_end + alignment - 1) // alignment * alignment
    data_end = data_start + max((t["offset"] + t["nbytes"] for t in tensors), default=0)
    if data_end > size:
        raise DupstudioError(
            f"{path}: the GGUF file is truncated: its tensors need {data_end} bytes but the file has "
            f"only {size} (incomplete download?)"
        )
    return {
        "version": version,
        "metadata": metadata,
        "tensors": tensors,
        "data_start": data_start,
        "file_size": size,
    }


def _tensor_info(r: _Reader, path: Path) -> Dict[str, Any]:
    name = r.string()
    n_dims = r.scalar("<I")
    if n_dims > 8:
        raise DupstudioError(f"{path}: corrupt GGUF header (tensor {name!r} has {n_dims} dims)")
    dims = [r.scalar("<Q") for _ in range(n_dims)]
    ttype = r.scalar("<I")
    offset = r.scalar("<Q")
    if ttype not in GGML_TYPES:
        raise DupstudioError(
            f"{path}: tensor {name!r} has unknown ggml type id {ttype} (newer GGUF than supported?)"
        )
    tname, block, block_bytes = GGML_TYPES[ttype]
    n_el = 1
    for d in dims:
        n_el *= d
    if dims and dims[0] % block:
        raise DupstudioError(
            f"{path}: tensor {name!r} ({tname}) has a row length {dims[0]} that is not a multiple of {block}"
        )
    return {
        "name": name,
        # GGUF lists dims innermost first; shape is the row-major (numpy/MLX) order
        "shape": tuple(reversed(dims)),
        "type": tname,
        "offset": offset,
        "nbytes": n_el // block * block_bytes,
    }


def _check_tensor_layout(tensors: List[Dict[str, Any]], alignment: int, path: Path) -> None:
    """Unique names and aligned offsets (what the GGUF format promises; the sizes are checked
    against the file by the caller)."""
    seen = set()
    for t in tensors:
        if t["name"] in seen:
            raise DupstudioError(f"{path}: corrupt GGUF header (tensor {t['name']!r} appears twice)")
        seen.add(t["name"])
        if t["offset"] % alignment:
            raise DupstudioError(f"{path}: corrupt GGUF header (tensor {t['name']!r} at offset "
                                 f"{t['offset']}, not a multiple of the alignment {alignment})")


def _arch_key(meta: Dict[str, Any], arch: str, key: str, default: Any = None) -> Any:
    return meta.get(f"{arch}.{key}", default)


def read_gguf_info(path: PathLike) -> Dict[str, Any]:
    """Cheap summary of a GGUF file from its header (no tensor data is read).

    Returns a dict with ``path``, ``file_size``, ``gguf_version``, ``architecture``, ``name``,
    ``blocks``, ``hidden_size``, ``intermediate_size``, ``attention_heads``, ``kv_heads``,
    ``vocab_size``, ``context_length``, ``n_tensors``, ``n_parameters``, ``quant_types`` (sorted
    list of tensor types seen), ``tensor_type_counts`` (type -> count), ``supported`` (whether
    :func:`convert_gguf` can convert it) and ``problems`` (reasons it cannot).
    Raises DupstudioError when the file is not a readable GGUF.
    """
    path = Path(path)
    h = _parse_gguf_header(path, skip_arrays=True)
    meta = h["metadata"]
    arch = meta.get("general.architecture")
    arch = arch if isinstance(arch, str) else None
    counts: Dict[str, int] = {}
    n_params = 0
    for t in h["tensors"]:
        counts[t["type"]] = counts.get(t["type"], 0) + 1
        n = 1
        for d in t["shape"]:
            n *= d
        n_params += n
    vocab = _arch_key(meta, arch, "vocab_size") if arch else None
    if vocab is None:
        tok = meta.get("tokenizer.ggml.tokens")
        vocab = tok.count if isinstance(tok, _SkippedArray) else None
    problems = _support_problems(meta, h["tensors"])
    return {
        "path": str(path),
        "file_size": h["file_size"],
        "gguf_version": h["version"],
        "architecture": arch,
        "name": meta.get("general.name"),
        "blocks": _arch_key(meta, arch, "block_count") if arch else None,
        "hidden_size": _arch_key(meta, arch, "embedding_length") if arch else None,
        "intermediate_size": _arch_key(meta, arch, "feed_forward_length") if arch else None,
        "attention_heads": _arch_key(meta, arch, "attention.head_count") if arch else None,
        "kv_heads": _arch_key(meta, arch, "attention.head_count_kv") if arch else None,
        "vocab_size": vocab,
        "context_length": _arch_key(meta, arch, "context_length") if arch else None,
        "n_tensors": len(h["tensors"]),
        "n_parameters": n_params,
        "quant_types": sorted(counts),
        "tensor_type_counts": counts,
        "supported": not problems,
        "problems": problems,
    }


def _support_problems(meta: Dict[str, Any], tensors: List[Dict[str, Any]]) -> List[str]:
    problems = []
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        problems.append(
            f"architecture {arch!r} is not supported (supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
        )
    # one problem per unsupported type, naming the first tensor of that type
    first_of_type: Dict[str, str] = {}
    for t in tensors:
        if t["type"] not in DECODABLE_TYPES:
            first_of_type.setdefault(t["type"], t["name"])
    for ttype, name in sorted(first_of_type.items()):
        problems.append(unsupported_message(name, ttype))
    problem = _tokenizer_problem(meta)
    if problem:
        problems.append(problem)
    if any(t["name"] == "rope_freqs.weight" for t in tensors):
        problems.append("rope frequency factors (rope_freqs, Llama-3.1-style rope scaling) are not supported")
    return problems


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def sha256_file(path: PathLike, *, cancel: Optional[CancelToken] = None, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            if cancel is not None:
                cancel.check()
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _linear_names(pairs) -> Dict[str, str]:
    """GGUF ``<stem>.weight``/``.bias`` -> mlx-lm ``<path>.weight``/``.bias`` for linear layers."""
    out = {}
    for stem, path in pairs:
        out[f"{stem}.weight"] = f"{path}.weight"
        out[f"{stem}.bias"] = f"{path}.bias"
    return out


def _norm_names(pairs) -> Dict[str, str]:
    return {f"{stem}.weight": f"{path}.weight" for stem, path in pairs}


#: llama's seven linears (llama, mistral, qwen2, qwen3, gemma3); a bias the mlx-lm model has no
#: place for is refused by the shape check, not here
_SEVEN = _linear_names([
    ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj"),
])
_QK_NORMS = _norm_names([("attn_q_norm", "self_attn.q_norm"), ("attn_k_norm", "self_attn.k_norm")])
_LLAMA_NORMS = _norm_names([("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")])


@dataclass(frozen=True)
class _GGUFArch:
    """How one llama.cpp architecture maps onto an mlx-lm model type."""
    model_type: str  # config.json model_type (the mlx-lm module)
    hf_class: str  # config.json architectures[0]
    block: Dict[str, str]  # GGUF name under blk.N -> mlx-lm name under model.layers.N
    #: llama.cpp's llama converter permutes q/k rows for its adjacent-pair rope
    permute_qk: bool = False
    #: the converter stores norm weights plus this (Gemma's 1 + w norms)
    norm_shift: float = 0.0
    #: config.json carries head_dim (else mlx-lm computes hidden / heads, and a file whose
    #: key_length differs cannot be represented)
    head_dim_in_config: bool = True
    rms_eps_default: float = 1e-5
    #: rope.scaling.type values this mlx-lm model takes
    rope_scalings: Tuple[str, ...] = ("linear",)
    #: global tensors that are configuration, not weights (GGUF name -> rope_scaling key)
    config_tensors: Dict[str, str] = field(default_factory=dict)


_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_ARCHS: Dict[str, _GGUFArch] = {
    "llama": _GGUFArch("llama", "LlamaForCausalLM", {**_SEVEN, **_LLAMA_NORMS}, permute_qk=True),
    "qwen2": _GGUFArch("qwen2", "Qwen2ForCausalLM", {**_SEVEN, **_LLAMA_NORMS},
                       head_dim_in_config=False, rms_eps_default=1e-6,
                       rope_scalings=("linear", "yarn")),
    "qwen3": _GGUFArch("qwen3", "Qwen3ForCausalLM", {**_SEVEN, **_LLAMA_NORMS, **_QK_NORMS},
                       rms_eps_default=1e-6, rope_scalings=("linear", "yarn")),
    # (Gemma's ffn_norm is the norm before the MLP; post_attention_norm and post_ffw_norm scale
    # the attention and MLP outputs)
    "gemma3": _GGUFArch("gemma3_text", "Gemma3ForCausalLM", {
        **_SEVEN, **_QK_NORMS, **_norm_names([
            ("attn_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
            ("ffn_norm", "pre_feedforward_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm"),
        ])}, norm_shift=1.0, rms_eps_default=1e-6),
    # (phi3's ffn_up is Hugging Face's gate_up_proj: gate rows first, then up rows)
    "phi3": _GGUFArch("phi3", "Phi3ForCausalLM", {
        **_linear_names([("attn_qkv", "self_attn.qkv_proj"), ("attn_output", "self_attn.o_proj"),
                         ("ffn_up", "mlp.gate_up_proj"), ("ffn_down", "mlp.down_proj")]),
        **_LLAMA_NORMS}, head_dim_in_config=False, rope_scalings=(),
        config_tensors={"rope_factors_long.weight": "long_factor",
                        "rope_factors_short.weight": "short_factor"}),
}
_ARCHS["mistral"] = _ARCHS["llama"]
assert set(_ARCHS) == SUPPORTED_ARCHITECTURES


def _hf_name(gguf_name: str, arch: str = "llama") -> Optional[str]:
    """The mlx-lm weight name of a GGUF tensor of architecture ``arch`` (None: not a weight
    this architecture has; a configuration tensor such as phi3's rope factors is not a weight)."""
    if gguf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[gguf_name]
    block = _ARCHS[arch].block
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in block:
        return f"model.layers.{int(parts[1])}.{block[parts[2]]}"
    return None


def _unpermute_rows(w, n_head: int):
    """Invert llama.cpp's convert permutation of Q/K rows (rope pair layout -> HF rotate-half).

    llama.cpp: ``w.reshape(n_head, 2, d // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)``.
    """
    rows = w.shape[0]
    rest = tuple(w.shape[1:])
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of even size")
    return w.reshape((n_head, rows // n_head // 2, 2) + rest).swapaxes(1, 2).reshape((rows,) + rest)


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) -> builder of a tokenizers pre-tokenizer
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_smollm():
    from tokenizers import pre_tokenizers

    # llama.cpp "smollm": regexes {"\p{N}", GPT-2 regex} == HF SmolLM tokenizer.json
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _pre_gpt2():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _pre_llama3():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _pre_qwen2():
    from tokenizers import Regex, pre_tokenizers

    # llama.cpp "qwen2" (Qwen2, Qwen2.5, Qwen3): llama 3's split with single digits
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

_PRE_TOKENIZERS = {
    "smollm": _pre_smollm,
    "default": _pre_gpt2,
    "gpt2": _pre_gpt2,
    "gpt-2": _pre_gpt2,
    "llama-bpe": _pre_llama3,
    "llama3": _pre_llama3,
    "qwen2": _pre_qwen2,
}
#: pre-tokenizers whose Hugging Face tokenizer.json also NFC-normalizes the text
_NFC_PRE = frozenset({"qwen2"})

# llama.cpp token types (tokenizer.ggml.token_type)
_TOKEN_TYPE_NORMAL = 1
_TOKEN_TYPE_UNKNOWN = 2
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4
#: the tokenizer models the converter rebuilds
_TOKENIZER_MODELS = "byte-level BPE 'gpt2', SentencePiece 'llama'"


def _tokenizer_problem(meta: Dict[str, Any]) -> Optional[str]:
    """Why the GGUF's tokenizer cannot be rebuilt (None: it can), from the header alone."""
    tok_model = meta.get("tokenizer.ggml.model")
    if tok_model == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in _PRE_TOKENIZERS:
            return f"pre-tokenizer {pre!r} is not supported (supported: {', '.join(sorted(_PRE_TOKENIZERS))})"
        return None
    if tok_model == "llama":
        if "tokenizer.ggml.scores" not in meta:
            return "the SentencePiece tokenizer has no scores (tokenizer.ggml.scores)"
        return None
    return f"tokenizer model {tok_model!r} is not supported (supported: {_TOKENIZER_MODELS})"


def _token_at(tokens: List[str], idx: Any) -> Optional[str]:
    if isinstance(idx, int) and 0 <= idx < len(tokens):
        return tokens[idx]
    return None


def _bpe_model(meta: Dict[str, Any], vocab: Dict[str, int], gguf_path: Path):
    """A byte-level BPE model with the GGUF's merges, its pre-tokenizer and decoder."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    merges = _as_list(meta.get("tokenizer.ggml.merges"))
    if merges is None:
        raise DupstudioError(f"{gguf_path}: the GGUF has no tokenizer merges")
    if not all(isinstance(m, str) for m in merges):
        raise DupstudioError(f"{gguf_path}: the GGUF tokenizer merges are not a list of strings")
    merge_pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise DupstudioError(f"{gguf_path}: malformed BPE merge {m!r}")
        merge_pairs.append((a, b))
    pre = meta.get("tokenizer.ggml.pre", "default")
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False))
    if pre in _NFC_PRE:
        tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tk.decoder = decoders.ByteLevel()
    return tk


def _spm_merges(tokens: List[str], scores: List[float], types: List[int],
                vocab: Dict[str, int]) -> List[Tuple[str, str]]:
    """BPE merges that reproduce a SentencePiece BPE vocabulary.

    SentencePiece (and llama.cpp's SPM tokenizer) repeatedly joins the adjacent pair whose
    concatenation is a piece with the highest score. A BPE model joins the pair with the best
    merge rank, so every split of a piece into two pieces becomes a merge, ranked by the joined
    piece's score (ties: the piece's id, then the halves' ids), as Hugging Face's
    SentencePieceExtractor builds the merges of its converted tokenizers. Only normal and
    user-defined pieces take part: control, unknown, unused and byte pieces never come from
    joining text."""
    ok = {_TOKEN_TYPE_NORMAL, _TOKEN_TYPE_USER_DEFINED}
    ranked = []
    for i, (piece, ty) in enumerate(zip(tokens, types)):
        if ty not in ok or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = vocab.get(piece[:k]), vocab.get(piece[k:])
            if left is not None and right is not None and types[left] in ok and types[right] in ok:
                ranked.append((-scores[i], i, left, right))
    ranked.sort()
    return [(tokens[left], tokens[right]) for _, _, left, right in ranked]


def _spm_model(meta: Dict[str, Any], tokens: List[str], types: List[int], vocab: Dict[str, int],
               unk: Optional[str], gguf_path: Path):
    """A SentencePiece vocabulary as a byte-fallback BPE tokenizer (the layout of Hugging Face's
    llama and Gemma tokenizer.json: spaces become "▁", a "▁" is prepended when the GGUF says
    ``add_space_prefix`` (llama.cpp's default for SentencePiece), bytes without a piece fall
    back to the <0xNN> pieces)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = _as_list(meta.get("tokenizer.ggml.scores"))
    if scores is None or len(scores) != len(tokens) or \
            not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
        raise DupstudioError(f"{gguf_path}: tokenizer.ggml.scores does not give one number per token")
    merges = _spm_merges(tokens, [float(x) for x in scores], types, vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                              byte_fallback=True))
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    replace = normalizers.Replace(" ", "\u2581")
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if add_prefix else replace
    # (the decoders mlx-lm recognises as SentencePiece's, for its streaming detokenizer)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(steps)
    return tk


def _build_tokenizer_files(meta: Dict[str, Any], gguf_path: Path) -> Dict[str, Any]:
    """Return {file name: json-able object} for the tokenizer side files (tokenizer.json is a str)."""
    from tokenizers import AddedToken, processors

    problem = _tokenizer_problem(meta)
    if problem:
        raise DupstudioError(f"{gguf_path}: {problem}")
    tok_model = meta.get("tokenizer.ggml.model")
    tokens = _as_list(meta.get("tokenizer.ggml.tokens"))
    types = _as_list(meta.get("tokenizer.ggml.token_type")) or [_TOKEN_TYPE_NORMAL] * len(tokens or [])
    if not tokens:
        raise DupstudioError(f"{gguf_path}: the GGUF has no tokenizer vocabulary")
    if not all(isinstance(t, str) for t in tokens):
        raise DupstudioError(f"{gguf_path}: the GGUF tokenizer tokens are not a list of strings")
    if len(types) != len(tokens) or not all(isinstance(t, int) for t in types):
        raise DupstudioError(f"{gguf_path}: tokenizer.ggml.token_type does not give one integer per token")
    vocab: Dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if len(vocab) != len(tokens):
        raise DupstudioError(f"{gguf_path}: the GGUF vocabulary has duplicate tokens")

    bos = _token_at(tokens, meta.get("tokenizer.ggml.bos_token_id"))
    eos = _token_at(tokens, meta.get("tokenizer.ggml.eos_token_id"))
    unk = _token_at(tokens, meta.get("tokenizer.ggml.unknown_token_id"))
    pad = _token_at(tokens, meta.get("tokenizer.ggml.padding_token_id"))
    spm = tok_model == "llama"
    if spm:
        if unk is None and _TOKEN_TYPE_UNKNOWN in types:
            unk = tokens[types.index(_TOKEN_TYPE_UNKNOWN)]
        tk = _spm_model(meta, tokens, types, vocab, unk, gguf_path)
    else:
        tk = _bpe_model(meta, vocab, gguf_path)

    specials = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == _TOKEN_TYPE_CONTROL:
            specials.append(AddedToken(t, special=True, normalized=False))
        elif ty == _TOKEN_TYPE_USER_DEFINED:
            specials.append(AddedToken(t, special=False, normalized=False))
    # add in id order so the ids stay those of the vocabulary
    special_objs = [a for a in specials if a.special]
    user_objs = [a for a in specials if not a.special]
    if special_objs:
        tk.add_special_tokens(special_objs)
    if user_objs:
        tk.add_tokens(user_objs)

    # llama.cpp adds a BOS by default for SentencePiece vocabularies, not for byte-level BPE
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", spm)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
        st = []
        if add_bos:
            st.append((bos, vocab[bos]))
        if add_eos and eos != bos:
            st.append((eos, vocab[eos]))
        tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=st)
    elif not spm:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)

    added_decoder = {}
    for a in special_objs + user_objs:
        added_decoder[str(vocab[a.content])] = {
            "content": a.content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": a.special,
        }
    special_names = [a.content for a in special_objs]
    extra_specials = [t for t in special_names if t not in {bos, eos, unk, pad}]

    cfg: Dict[str, Any] = {
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "add_prefix_space": False,
        "added_tokens_decoder": added_decoder,
        "additional_special_tokens": extra_specials,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_arch_key(meta, meta.get("general.architecture"), "context_length", 2048)),
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    tmpl = meta.get("tokenizer.chat_template")
    if isinstance(tmpl, str) and tmpl:
        cfg["chat_template"] = tmpl
    stm: Dict[str, Any] = {}
    for key, val in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad)):
        if val is not None:
            stm[key] = {"content": val, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    if extra_specials:
        stm["additional_special_tokens"] = extra_specials
    gen: Dict[str, Any] = {"_from_model_config": True}
    for key, mkey in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        v = meta.get(f"tokenizer.ggml.{mkey}_token_id")
        if isinstance(v, int):
            gen[key] = v
    return {
        "tokenizer.json": tk.to_str(pretty=False),
        "tokenizer_config.json": cfg,
        "special_tokens_map.json": stm,
        "generation_config.json": gen,
    }


def _as_list(v: Any) -> Optional[list]:
    if v is None:
        return None
    if isinstance(v, list):
        return v
    if hasattr(v, "tolist"):
        out = v.tolist()
        return out if isinstance(out, list) else [out]
    return list(v)


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


def _hparam(meta: Dict[str, Any], arch: str, key: str, gguf_path: Path, default: Any = None) -> int:
    """An integer hyper-parameter, present (or defaulted) and within its sane limit."""
    v = _arch_key(meta, arch, key, default)
    if v is None:
        raise DupstudioError(f"{gguf_path}: GGUF metadata lacks {arch}.{key}")
    hi = _HPARAM_LIMITS[key]
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
        raise DupstudioError(f"{gguf_path}: GGUF metadata {arch}.{key} is {v!r}; expected an "
                             f"integer in 1-{hi}")
    return v


def _fparam(meta: Dict[str, Any], arch: str, key: str, gguf_path: Path, default: float) -> float:
    """A positive finite float hyper-parameter."""
    v = _arch_key(meta, arch, key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
        raise DupstudioError(f"{gguf_path}: GGUF metadata {arch}.{key} is {v!r}; expected a "
                             f"positive number")
    return float(v)


def _block_indices(tensor_names: set) -> set:
    return {int(n.split(".", 2)[1]) for n in tensor_names
            if n.startswith("blk.") and n.split(".", 2)[1].isdigit()}


def _vocab_size(meta: Dict[str, Any], arch: str, gguf_path: Path) -> int:
    if _arch_key(meta, arch, "vocab_size") is not None:
        return _hparam(meta, arch, "vocab_size", gguf_path)
    tok = meta.get("tokenizer.ggml.tokens")
    n = tok.count if isinstance(tok, _SkippedArray) else len(_as_list(tok) or [])
    if not 1 <= n <= _HPARAM_LIMITS["vocab_size"]:
        raise DupstudioError(f"{gguf_path}: the GGUF vocabulary has {n} tokens")
    return n


def _attention_shape(meta: Dict[str, Any], arch: str, hidden: int, gguf_path: Path) -> tuple:
    """(heads, kv heads, head dim), consistent with each other."""
    n_heads = _hparam(meta, arch, "attention.head_count", gguf_path)
    n_kv = _hparam(meta, arch, "attention.head_count_kv", gguf_path, n_heads)
    if n_heads % n_kv:
        raise DupstudioError(f"{gguf_path}: {n_heads} attention heads cannot be shared by {n_kv} "
                             f"key/value heads")
    head_dim = _hparam(meta, arch, "attention.key_length", gguf_path, max(hidden // n_heads, 1))
    if head_dim % 2:
        raise DupstudioError(f"{gguf_path}: head dim {head_dim} is odd (rope rotates pairs)")
    v_dim = _hparam(meta, arch, "attention.value_length", gguf_path, head_dim)
    if v_dim != head_dim:
        raise DupstudioError(f"{gguf_path}: value heads of {v_dim} and key heads of {head_dim} "
                             f"are not supported (mlx-lm's models use one head size)")
    return n_heads, n_kv, head_dim


def _optional_hparam(meta: Dict[str, Any], arch: str, key: str, gguf_path: Path) -> Optional[int]:
    """An integer hyper-parameter where absent or 0 means "none" (e.g. no sliding window)."""
    v = _arch_key(meta, arch, key)
    return None if v is None or v == 0 else _hparam(meta, arch, key, gguf_path)


def _rope_scaling(meta: Dict[str, Any], arch: str, spec: _GGUFArch, gguf_path: Path,
                  tensor_names: set) -> Optional[Dict[str, Any]]:
    """config.json's rope_scaling from the ``rope.scaling.*`` keys (and phi3's factor tensors)."""
    factors = [n for n in spec.config_tensors if n in tensor_names]
    scaling = _arch_key(meta, arch, "rope.scaling.type")
    if factors:  # phi3's long-context ("longrope") factors, filled in once the tensors are read
        if len(factors) != len(spec.config_tensors):
            raise DupstudioError(f"{gguf_path}: the file holds {factors[0]} without its partner "
                                 f"({', '.join(sorted(spec.config_tensors))} come in pairs)")
        if scaling not in (None, "none", "longrope"):
            raise DupstudioError(f"{gguf_path}: rope scaling {scaling!r} with long-context factors")
        return {"type": "longrope", **{key: [] for key in spec.config_tensors.values()}}
    if not scaling or scaling == "none":
        return None
    if scaling not in spec.rope_scalings or not _arch_key(meta, arch, "rope.scaling.factor"):
        raise DupstudioError(f"{gguf_path}: rope scaling {scaling!r} is not supported for {arch}")
    out: Dict[str, Any] = {"type": scaling,
                           "factor": _fparam(meta, arch, "rope.scaling.factor", gguf_path, 1.0)}
    if scaling == "yarn":
        # what Hugging Face's yarn settings become in the file; mlx-lm has no place for llama.cpp's
        # own extrapolation/attention factors
        for key in ("rope.scaling.yarn_ext_factor", "rope.scaling.yarn_attn_factor",
                    "rope.scaling.yarn_log_multiplier"):
            if _arch_key(meta, arch, key) is not None:
                raise DupstudioError(f"{gguf_path}: yarn rope scaling with {arch}.{key} is not supported")
        out["original_max_position_embeddings"] = _hparam(
            meta, arch, "rope.scaling.original_context_length", gguf_path)
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if _arch_key(meta, arch, f"rope.scaling.{key}") is not None:
                out[name] = _round7(_fparam(meta, arch, f"rope.scaling.{key}", gguf_path, 1.0))
    return out


def _round7(x: float) -> float:
    """A float stored as float32 in GGUF, rounded back to the decimal it was written from
    (1e-05 comes back as 9.999999747378752e-06)."""
    return float(f"{x:.7g}")


def _build_config(meta: Dict[str, Any], tensor_names: set, gguf_path: Path) -> Dict[str, Any]:
    """config.json of the mlx-lm model type from the header metadata; every count is checked
    against its limit and the block count against the blocks the file actually holds."""
    arch = meta["general.architecture"]
    spec = _ARCHS[arch]
    hidden = _hparam(meta, arch, "embedding_length", gguf_path)
    n_heads, n_kv, head_dim = _attention_shape(meta, arch, hidden, gguf_path)
    n_blocks = _hparam(meta, arch, "block_count", gguf_path)
    held = _block_indices(tensor_names)
    if held != set(range(n_blocks)):
        raise DupstudioError(f"{gguf_path}: GGUF metadata says {n_blocks} blocks but the file holds "
                             f"tensors for {len(held)} (blk.0-{max(held, default=-1)})")
    if not spec.head_dim_in_config and head_dim != hidden // n_heads:
        raise DupstudioError(f"{gguf_path}: head dim {head_dim} differs from hidden size / heads "
                             f"({hidden} / {n_heads}), which mlx-lm's {spec.model_type} assumes")
    rope_dim = _hparam(meta, arch, "rope.dimension_count", gguf_path, head_dim)
    if rope_dim != head_dim and (arch != "phi3" or rope_dim > head_dim):
        raise DupstudioError(
            f"{gguf_path}: partial rope (rope dimension {rope_dim} != head dim {head_dim}) is not supported"
        )
    context = _hparam(meta, arch, "context_length", gguf_path, 131072 if arch == "gemma3" else 2048)
    tied = "output.weight" not in tensor_names
    cfg: Dict[str, Any] = {
        "architectures": [spec.hf_class],
        "model_type": spec.model_type,
        "hidden_size": hidden,
        "intermediate_size": _hparam(meta, arch, "feed_forward_length", gguf_path),
        "num_hidden_layers": n_blocks,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "rms_norm_eps": _round7(_fparam(meta, arch, "attention.layer_norm_rms_epsilon", gguf_path,
                                        spec.rms_eps_default)),
        # (llama.cpp's default base when the file does not say)
        "rope_theta": _round7(_fparam(meta, arch, "rope.freq_base", gguf_path, 10000.0)),
        "vocab_size": _vocab_size(meta, arch, gguf_path),
        "max_position_embeddings": context,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if spec.head_dim_in_config:
        cfg["head_dim"] = head_dim
    if spec.model_type == "llama":
        cfg["attention_bias"] = any(n.endswith("attn_q.bias") for n in tensor_names)
        cfg["mlp_bias"] = any(n.endswith("ffn_up.bias") for n in tensor_names)
    scaling = _rope_scaling(meta, arch, spec, gguf_path, tensor_names)
    if scaling is not None:
        for key in spec.config_tensors.values():
            if key in scaling:  # one factor per rotated pair; the values come with the tensor data
                scaling[key] = [1.0] * (rope_dim // 2)
        cfg["rope_scaling"] = scaling
    if arch == "gemma3":
        _gemma3_config(cfg, meta, arch, gguf_path)
    elif arch == "phi3":
        cfg["original_max_position_embeddings"] = _hparam(
            meta, arch, "rope.scaling.original_context_length", gguf_path, context)
        if rope_dim != head_dim:
            cfg["partial_rotary_factor"] = rope_dim / head_dim
            if int(head_dim * cfg["partial_rotary_factor"]) != rope_dim:
                raise DupstudioError(f"{gguf_path}: a rope dimension of {rope_dim} of a head of "
                                     f"{head_dim} cannot be expressed as mlx-lm's rotary factor")
        # (neither llama.cpp nor mlx-lm's phi3 applies the window; kept as the model states it)
        window = _optional_hparam(meta, arch, "attention.sliding_window", gguf_path)
        if window is not None:
            cfg["sliding_window"] = window
    for key, mkey in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        v = meta.get(f"tokenizer.ggml.{mkey}_token_id")
        if isinstance(v, int):
            cfg[key] = v
    if arch == "phi3":
        # transformers' Phi3Config otherwise pads with 32000, Phi-3-mini's id, which lies outside
        # other vocabularies (and transformers warns on every load)
        cfg.setdefault("pad_token_id", None)
    return cfg


#: Gemma 3's sliding-window layers: llama.cpp reads no pattern from the file and makes every
#: sixth layer global (the pattern of every Gemma 3 model); a file that states one is followed
GEMMA3_SLIDING_PATTERN = 6
#: ... and it gives the sliding layers' rope this base
GEMMA3_LOCAL_ROPE_BASE = 10000.0
#: ... and it scales the queries of the 62-block model (Gemma 3 27B) by 1/sqrt(hidden / heads)
GEMMA3_27B_BLOCKS = 62


def _gemma3_config(cfg: Dict[str, Any], meta: Dict[str, Any], arch: str, gguf_path: Path) -> None:
    """Gemma 3's own entries: sliding windows, local rope base and the query scale, as llama.cpp
    runs the file (none of the last three is stored by its converter)."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if _arch_key(meta, arch, key):
            raise DupstudioError(f"{gguf_path}: {arch}.{key} is set; mlx-lm's gemma3_text has no "
                                 f"soft-capping")
    window = _optional_hparam(meta, arch, "attention.sliding_window", gguf_path)
    pattern = _arch_key(meta, arch, "attention.sliding_window_pattern")
    if window is None:  # no sliding layers
        window, pattern = cfg["max_position_embeddings"], 1
    elif pattern is None:
        pattern = GEMMA3_SLIDING_PATTERN
    elif isinstance(pattern, (list, _SkippedArray)):
        raise DupstudioError(f"{gguf_path}: a per-layer sliding-window pattern "
                             f"({arch}.attention.sliding_window_pattern) is not supported")
    else:
        pattern = _hparam(meta, arch, "attention.sliding_window_pattern", gguf_path)
    cfg["sliding_window"] = window
    cfg["sliding_window_pattern"] = pattern
    cfg["rope_local_base_freq"] = _round7(_fparam(meta, arch, "rope.freq_base_swa", gguf_path,
                                                  GEMMA3_LOCAL_ROPE_BASE))
    n_heads = cfg["num_attention_heads"]
    cfg["query_pre_attn_scalar"] = (cfg["hidden_size"] // n_heads
                                    if cfg["num_hidden_layers"] == GEMMA3_27B_BLOCKS else cfg["head_dim"])
    cfg["hidden_activation"] = "gelu_pytorch_tanh"
    del cfg["hidden_act"]


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    text = obj if isinstance(obj, str) else json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def plan_conversion(gguf_path: PathLike) -> Dict[str, Any]:
    """Everything about a conversion that the header alone decides, checked before any tensor
    is read: supported architecture/types/tokenizer, known tensor names, hyper-parameters
    within limits and consistent with the tensors' shapes. Returns ``{"header", "infos",
    "config"}``; raises DupstudioError naming the first problem."""
    gguf_path = Path(gguf_path)
    header = _parse_gguf_header(gguf_path, skip_arrays=True)
    meta = header["metadata"]
    problems = _support_problems(meta, header["tensors"])
    if problems:
        raise DupstudioError(f"{gguf_path}: cannot convert: " + "; ".join(problems))
    arch = meta["general.architecture"]
    spec = _ARCHS[arch]
    infos = {t["name"]: t for t in header["tensors"]}
    names = {n: _hf_name(n, arch) for n in infos if n not in spec.config_tensors}
    unknown = [n for n, hf in names.items() if hf is None]
    if unknown:
        raise DupstudioError(
            f"{gguf_path}: unexpected tensor(s) for a {arch} model: {', '.join(sorted(unknown)[:5])}"
        )
    shapes = {hf: tuple(infos[n]["shape"]) for n, hf in names.items()}
    if len(shapes) != len(names):
        raise DupstudioError(f"{gguf_path}: two tensors map onto the same weight (e.g. blk.1 and blk.01)")
    config = _build_config(meta, set(infos), gguf_path)
    _check_shapes(shapes, config, gguf_path)
    scaling = config.get("rope_scaling") or {}
    for n, key in spec.config_tensors.items():
        if n in infos and tuple(infos[n]["shape"]) != (len(scaling[key]),):
            raise DupstudioError(f"{gguf_path}: {n} has shape {tuple(infos[n]['shape'])}, "
                                 f"expected {(len(scaling[key]),)}")
    return {"header": header, "infos": infos, "config": config, "arch": arch, "names": names}


def _read_metadata(gguf_path: Path, header: Dict[str, Any]) -> Dict[str, Any]:
    """The full metadata, arrays (the tokenizer's vocabulary and merges) included.

    The planning pass skips arrays to stay cheap; this second pass reads them with the same
    bounded parser. The tensor table must be the one that was planned (the file may not change
    between the two reads)."""
    full = _parse_gguf_header(gguf_path, skip_arrays=False)
    if full["tensors"] != header["tensors"] or full["data_start"] != header["data_start"]:
        raise DupstudioError(f"{gguf_path}: the file changed while it was being converted")
    return full["metadata"]


def iter_gguf_tensors(gguf_path: PathLike, header: Optional[Dict[str, Any]] = None,
                      *, cancel: Optional[CancelToken] = None):
    """Yield ``(tensor info, float32 numpy array)`` for each tensor of a GGUF file, in file
    order, decoding one tensor at a time (the array's shape is the row-major ``info["shape"]``).

    ``header`` is a parsed header of this file (parsed here when omitted). A tensor of a type
    that cannot be decoded raises DupstudioError naming the tensor, its type and the supported
    types."""
    gguf_path = Path(gguf_path)
    if header is None:
        header = _parse_gguf_header(gguf_path, skip_arrays=True)
    try:
        fh = open(gguf_path, "rb")
    except OSError as exc:
        raise DupstudioError(f"{gguf_path}: cannot be read ({exc.strerror or exc})") from exc
    with fh:
        for info in header["tensors"]:
            if cancel is not None:
                cancel.check()
            try:
                arr = read_tensor(fh, header["data_start"] + info["offset"], info["type"],
                                  info["shape"], tensor=info["name"], source=str(gguf_path))
            except OSError as exc:
                raise DupstudioError(f"{gguf_path}: cannot read tensor {info['name']!r} "
                                     f"({exc.strerror or exc})") from exc
            yield info, arr


def convert_gguf(
    gguf_path: PathLike,
    out_dir: PathLike,
    *,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
) -> Path:
    """Convert a llama-family GGUF file into an mlx-lm model directory at ``out_dir``.

    Weights are the exact float32 dequantized GGUF values. The result appears atomically: it is
    built in a temporary sibling folder and renamed into place; the marker ``dupstudio-complete.json``
    is written last. An existing ``out_dir`` is replaced only if it is empty or a previous
    conversion (it holds the marker); otherwise DupstudioError is raised. Returns ``out_dir``.
    """
    progress, cancel = ensure(progress, cancel)
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    t0 = time.perf_counter()

    progress(0.0, f"Reading {gguf_path.name}")
    plan = plan_conversion(gguf_path)
    if out_dir.exists() and not _replaceable(out_dir):
        raise DupstudioError(
            f"{out_dir}: already exists and is not a dupstudio conversion; refusing to overwrite it"
        )
    cancel.check()
    progress(0.02, "Hashing the GGUF file")
    digest = sha256_file(gguf_path, cancel=cancel)
    cancel.check()
    progress(0.05, "Reading the GGUF metadata")
    meta = _read_metadata(gguf_path, plan["header"])
    cancel.check()
    progress(0.08, "Building the tokenizer")
    tok_files = _build_tokenizer_files(meta, gguf_path)
    remove_stale(out_dir.parent)
    tmp = make_temp_dir(out_dir, "partial")
    try:
        with user_io(out_dir):
            weights = _dequantize_all(plan, gguf_path, progress, cancel)
            _write_conversion(tmp, weights, plan, meta, tok_files, gguf_path, digest, t0,
                              progress, cancel)
            del weights
            _install(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(1.0, f"Converted {gguf_path.name} in {time.perf_counter() - t0:.1f} s")
    return out_dir


def _dequantize_all(plan: Dict[str, Any], gguf_path: Path, progress, cancel) -> Dict[str, Any]:
    """{mlx-lm name: float32 mlx weight}, decoded tensor by tensor, with llama.cpp's changes
    undone (llama's q/k rows back in the rotate-half layout, Gemma's norms without the 1 its
    converter adds). A configuration tensor (phi3's rope factors) goes into the plan's config."""
    import mlx.core as mx

    spec = _ARCHS[plan["arch"]]
    n_heads = plan["config"]["num_attention_heads"]
    n_kv = plan["config"]["num_key_value_heads"]
    n = len(plan["infos"])
    weights: Dict[str, Any] = {}
    tensors = iter_gguf_tensors(gguf_path, plan["header"], cancel=cancel)
    for i, (info, w) in enumerate(tensors):
        name = info["name"]
        if name in spec.config_tensors:
            plan["config"]["rope_scaling"][spec.config_tensors[name]] = [float(x) for x in w]
            continue
        heads = None
        if spec.permute_qk:
            heads = n_heads if name.endswith(("attn_q.weight", "attn_q.bias")) else \
                n_kv if name.endswith(("attn_k.weight", "attn_k.bias")) else None
        if heads is not None:
            try:
                w = _unpermute_rows(w, heads)
            except ValueError as exc:  # a bias's length is not checked against the config
                raise DupstudioError(f"{gguf_path}: tensor {name!r}: {exc}") from exc
        if spec.norm_shift and name.endswith("norm.weight"):
            w = w - np.float32(spec.norm_shift)
        weights[plan["names"][name]] = mx.array(w)
        del w  # mlx holds its own copy; keep one decoded tensor alive at a time
        progress(0.1 + 0.75 * (i + 1) / n, f"Dequantized {name} ({info['type']})")
    return weights


def _write_conversion(tmp: Path, weights, plan, meta, tok_files, gguf_path: Path, digest: str,
                      t0: float, progress, cancel) -> None:
    """model.safetensors, config.json, the tokenizer files, then the marker (last)."""
    import mlx.core as mx

    header, config = plan["header"], dict(plan["config"])
    cancel.check()
    progress(0.86, "Writing model.safetensors")
    st_meta = {"format": "mlx", "dupstudio_source": gguf_path.name, "dupstudio_source_sha256": digest}
    atomic_write_bytes(tmp / WEIGHTS_NAME, lambda f: mx.save_safetensors(f, weights, metadata=st_meta))
    cancel.check()
    progress(0.95, "Writing config and tokenizer")
    config["dupstudio_source"] = {
        "file": gguf_path.name,
        "sha256": digest,
        "size": header["file_size"],
        "architecture": meta["general.architecture"],
        "name": meta.get("general.name"),
        "file_type": meta.get("general.file_type"),
        "tensor_types": sorted({t["type"] for t in header["tensors"]}),
    }
    _write_json(tmp / "config.json", config)
    for fname, obj in tok_files.items():
        _write_json(tmp / fname, obj)
    cancel.check()
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    marker = {
        "format": MARKER_FORMAT,
        "kind": "gguf-conversion",
        "source": {"file": gguf_path.name, "sha256": digest, "size": header["file_size"]},
        "files": files,
        "seconds": round(time.perf_counter() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_json(tmp / MARKER_NAME, marker)


@contextlib.contextmanager
def _global_rng_kept():
    """mlx-lm's layers draw their initial weights from mlx's global random key. A model built
    only for its shapes leaves the key as it found it, so that what a caller draws afterwards
    does not depend on whether a conversion ran first (the key is two 32-bit words, the
    seed that recreates it)."""
    import mlx.core as mx

    hi, lo = (int(x) for x in mx.random.state[0].tolist())
    try:
        yield
    finally:
        mx.random.seed((hi << 32) | lo)


def _mlx_lm_shapes(cfg: Dict[str, Any], gguf_path: Path) -> Dict[str, tuple]:
    """{weight name: shape} of mlx-lm's model for ``cfg``. The model is only built, never
    evaluated: mlx initialises its parameters lazily, so nothing is allocated, whatever the size."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    try:
        model_class, args_class = _get_classes(cfg)
        with _global_rng_kept():
            model = model_class(args_class.from_dict(cfg))
    except Exception as exc:  # mlx-lm's own checks of its arguments
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise DupstudioError(f"{gguf_path}: mlx-lm cannot build a {cfg['model_type']} model from "
                             f"this file's settings ({msg})") from exc
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    if cfg["tie_word_embeddings"]:
        shapes.pop("lm_head.weight", None)  # (Gemma 3 has the layer and drops it when tied)
    return shapes


def _check_shapes(shapes: Dict[str, tuple], cfg: Dict[str, Any], gguf_path: Path) -> None:
    """Every weight of mlx-lm's model for ``cfg`` is present with its shape, and nothing else
    (``shapes``: mlx-lm name -> shape). The caller has checked the block count against the
    blocks in the file."""
    expect = _mlx_lm_shapes(cfg, gguf_path)
    for k, shp in expect.items():
        if k not in shapes:
            raise DupstudioError(f"{gguf_path}: missing tensor for {k}")
        if tuple(shapes[k]) != shp:
            raise DupstudioError(f"{gguf_path}: {k} has shape {tuple(shapes[k])}, expected {shp}")
    extra = sorted(set(shapes) - set(expect))
    if extra:
        raise DupstudioError(f"{gguf_path}: mlx-lm's {cfg['model_type']} model has no place for "
                             f"{', '.join(extra[:5])}")


def _replaceable(out_dir: Path) -> bool:
    if not out_dir.is_dir():
        return False
    entries = list(out_dir.iterdir())
    return not entries or (out_dir / MARKER_NAME).is_file()


def _install(tmp: Path, out_dir: Path) -> None:
    """Rename tmp into place; an existing (replaceable) out_dir is moved aside first."""
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        if not _replaceable(out_dir):
            raise DupstudioError(
                f"{out_dir}: already exists and is not a dupstudio conversion; refusing to overwrite it"
            )
        old = temp_sibling(out_dir, "old")
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_complete_conversion(out_dir: PathLike, *, source_sha256: Optional[str] = None) -> bool:
    """True when ``out_dir`` holds a finished conversion: the marker parses and every file it
    lists exists with the listed size (config.json and model.safetensors among them). With
    ``source_sha256``, the conversion must also come from that GGUF file."""
    d = Path(out_dir)
    try:
        marker = json.loads((d / MARKER_NAME).read_text(encoding="utf-8"))
        if marker.get("format") != MARKER_FORMAT:
            return False
        files = marker["files"]
        if not isinstance(files, dict) or "config.json" not in files or WEIGHTS_NAME not in files:
            return False
        for name, size in files.items():
            p = d / name
            if Path(name).name != name or not p.is_file() or p.stat().st_size != int(size):
                return False
        if source_sha256 is not None and marker.get("source", {}).get("sha256") != source_sha256:
            return False
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
