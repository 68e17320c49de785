"""What dupstudio knows about each decoder architecture, kept as data in this one module.

dupstudio never re-implements a decoder block: it runs mlx-lm's own block classes (attention,
rotary embedding, norms, sliding windows and all) and only swaps their linear layers for
quantized or dequantized ones. What it must know about an architecture is therefore small, and
all of it lives here:

* which mlx-lm module implements it (``mlx_lm.models.<module>``; mistral is mlx-lm's llama);
* the decoder blocks (``model.model.layers``) and, per block, the linear layers dupstudio
  quantizes (the *matrix list*): their names, where they sit in the block, what input they read
  and how their rows split into parts. A fused linear (phi3's ``qkv_proj`` and
  ``gate_up_proj``) is ONE matrix whose rows are the concatenation of its parts; the matrix list
  therefore differs between architectures;
* which norm's weight scales the input of each linear group, so that a per-column gain of that
  group folds into the norm (``attn``: the q/k/v input, ``mlp``: the gate/up input), and which
  rows the column gain of a group without a norm in front folds into (``o``: the value rows,
  ``down``: the up rows);
* quirks: Gemma 3 scales the embedding output by √hidden (rounded through bfloat16, as mlx-lm
  does), its norms multiply by ``1 + weight`` (a column gain ``c`` folds as ``(1 + w)·c − 1``)
  and some of its layers attend within a sliding window; llama-style ``layer_types`` may mark
  sliding layers too; qwen2's q/k/v have biases (kept in floating point, scaled with their
  rows); phi3 unties the head by default.

Every refusal of an architecture lists :data:`SUPPORTED_MODEL_TYPES`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

from dupstudio.core.jobs import DupstudioError

#: column groups: the inputs that linears share (see :mod:`dupstudio.core.config`)
GROUPS = ("attn", "o", "mlp", "down")


@dataclass(frozen=True)
class Matrix:
    """One quantized linear of a decoder block.

    ``rows``: the parts its output rows are made of, in order, each ``(part, size symbol)``;
    ``cols``: the size symbol of its input. Size symbols: ``H`` hidden size, ``I`` MLP width,
    ``q`` query width (heads × head dim), ``kv`` key/value width (KV heads × head dim)."""
    name: str
    path: str  # under the block, e.g. "self_attn.q_proj"
    reads: str  # the column group of its input (one of GROUPS)
    rows: tuple
    cols: str


def _m(name, parent, reads, rows, cols):
    return Matrix(name, f"{parent}.{name}", reads, tuple(rows), cols)


#: llama's seven linears (also mistral, qwen2, qwen3, gemma3_text)
SEVEN = (
    _m("q_proj", "self_attn", "attn", [("q", "q")], "H"),
    _m("k_proj", "self_attn", "attn", [("k", "kv")], "H"),
    _m("v_proj", "self_attn", "attn", [("v", "kv")], "H"),
    _m("o_proj", "self_attn", "o", [("o", "H")], "q"),
    _m("gate_proj", "mlp", "mlp", [("gate", "I")], "H"),
    _m("up_proj", "mlp", "mlp", [("up", "I")], "H"),
    _m("down_proj", "mlp", "down", [("down", "H")], "I"),
)
#: phi3's four: q/k/v fused into one matrix, gate/up into another
FUSED = (
    _m("qkv_proj", "self_attn", "attn", [("q", "q"), ("k", "kv"), ("v", "kv")], "H"),
    _m("o_proj", "self_attn", "o", [("o", "H")], "q"),
    _m("gate_up_proj", "mlp", "mlp", [("gate", "I"), ("up", "I")], "H"),
    _m("down_proj", "mlp", "down", [("down", "H")], "I"),
)


@dataclass(frozen=True)
class Architecture:
    name: str  # the mlx-lm module (mlx_lm.models.<name>)
    model_types: tuple  # config.json model_type values it serves
    matrices: tuple
    #: column group -> the norm (under the block) whose weight scales that group's input
    col_norms: dict = field(default_factory=lambda: {"attn": "input_layernorm",
                                                     "mlp": "post_attention_layernorm"})
    #: column group without a norm in front -> the row part its gain folds into
    col_parts: dict = field(default_factory=lambda: {"o": "v", "down": "up"})
    #: the norms compute x̂·(norm_offset + weight): 0 for nn.RMSNorm, 1 for Gemma's
    norm_offset: float = 0.0
    #: the embedding output is multiplied by √hidden (rounded through bfloat16)
    embed_scale: bool = False
    #: the head shares the embedding when config.json does not say
    tied_default: bool = True
    #: head_dim comes from config.json (else hidden / heads, whatever config.json says)
    head_dim_from_config: bool = True
    #: how sliding-window layers are marked: None, "layer_types" (llama) or "pattern" (Gemma 3:
    #: every ``sliding_window_pattern``-th layer is global, the others slide)
    windows: Optional[str] = None
    notes: str = ""

    @property
    def module(self) -> str:
        return f"mlx_lm.models.{self.name}"

    @property
    def matrix_names(self) -> tuple:
        return tuple(m.name for m in self.matrices)

    def matrix(self, name: str) -> Matrix:
        for m in self.matrices:
            if m.name == name:
                return m
        raise DupstudioError(f"{self.name}: no matrix {name!r} (its matrices: "
                             f"{', '.join(self.matrix_names)})")

    def inputs(self) -> dict:
        """matrix name -> column group of its input."""
        return {m.name: m.reads for m in self.matrices}

    # ---------------------------------------------------------------- sizes
    def sizes(self, shape: dict) -> dict:
        return {"H": shape["hidden_size"], "I": shape["intermediate_size"],
                "q": shape["num_heads"] * shape["head_dim"],
                "kv": shape["num_kv_heads"] * shape["head_dim"]}

    def dims(self, shape: dict) -> dict:
        """matrix name -> (out, in) for a model of ``shape`` (model_io.model_shape)."""
        s = self.sizes(shape)
        return {m.name: (sum(s[sym] for _, sym in m.rows), s[m.cols]) for m in self.matrices}

    def llama_parts(self, name: str) -> tuple:
        """The llama matrices matrix ``name`` stands for (a fused one: its parts, e.g. phi3's
        qkv_proj -> q_proj, k_proj, v_proj), for descriptions in llama's terms (the roofline)."""
        return tuple(f"{part}_proj" for part, _ in self.matrix(name).rows)

    def fold_matrix(self, group: str) -> str:
        """The matrix whose rows the column gain of ``group`` ("o" or "down") folds into."""
        part = self.col_parts[group]
        for m in self.matrices:
            if any(p == part for p, _ in m.rows):
                return m.name
        raise DupstudioError(f"{self.name}: no rows {part!r} to fold the {group} column gain into")

    def fold_rows(self, group: str, shape: dict) -> tuple:
        """(matrix, first row, end row) that the column gain of ``group`` ("o" or "down") folds
        into: the rows producing that group's input."""
        part = self.col_parts[group]
        s = self.sizes(shape)
        for m in self.matrices:
            start = 0
            for p, sym in m.rows:
                if p == part:
                    return m.name, start, start + s[sym]
                start += s[sym]
        raise DupstudioError(f"{self.name}: no rows {part!r} to fold the {group} column gain into")

    def fold_norm(self, weight, gain):
        """The norm weight that makes the norm's output ``gain`` times the original's."""
        if not self.norm_offset:
            return weight * gain
        return (self.norm_offset + weight) * gain - self.norm_offset

    # ---------------------------------------------------------------- model pieces
    def block_window(self, args, k: int) -> Optional[int]:
        """The sliding window of block k (None: full attention), as mlx-lm's model decides it."""
        if self.windows == "layer_types":
            lt = getattr(args, "layer_types", None)
            if lt and lt[k] == "sliding_attention":
                return int(args.sliding_window)
        elif self.windows == "pattern":
            p = int(args.sliding_window_pattern)
            if p > 1 and (k + 1) % p != 0:
                return int(args.sliding_window)
        return None

    def block_mask(self, args, k: int, h, cache=None):
        """The attention mask block k gets for hidden states ``h`` (mlx-lm's own choice:
        "causal", None for one token, or an array for a window shorter than the input)."""
        from mlx_lm.models.base import create_attention_mask

        return create_attention_mask(h, cache, window_size=self.block_window(args, k))

    def causal_mask(self, args, k: int, length: int):
        """The mask of block k for ``length`` tokens without a cache (calibration, evaluation):
        "causal", or the windowed causal mask when block k's window is shorter than the input."""
        from mlx_lm.models.base import create_causal_mask

        w = self.block_window(args, k)
        if length <= 1:
            return None  # (as create_attention_mask: one token needs no mask)
        if w is not None and length > w:
            return create_causal_mask(length, window_size=w)
        return "causal"

    def make_block_cache(self, args, k: int):
        """A KV cache for one pass of block k (a rotating one for a sliding-window block)."""
        from mlx_lm.models.cache import KVCache, RotatingKVCache

        w = self.block_window(args, k)
        return KVCache() if w is None else RotatingKVCache(max_size=w)

    def scale_embeddings(self, h, args):
        """The embedding output as the architecture's model feeds it to block 0."""
        if not self.embed_scale:
            return h
        import mlx.core as mx

        return h * mx.array(args.hidden_size ** 0.5, mx.bfloat16).astype(h.dtype)


ARCHITECTURES = (
    Architecture("llama", ("llama", "mistral"), SEVEN, windows="layer_types",
                 notes="mistral is mlx-lm's llama"),
    Architecture("qwen2", ("qwen2",), SEVEN, head_dim_from_config=False,
                 notes="q/k/v have biases"),
    Architecture("qwen3", ("qwen3",), SEVEN, notes="per-head q/k norms (kept in floating point)"),
    Architecture("gemma3_text", ("gemma3_text",),
                 SEVEN, col_norms={"attn": "input_layernorm", "mlp": "pre_feedforward_layernorm"},
                 norm_offset=1.0, embed_scale=True, windows="pattern",
                 notes="(1 + w) norms, extra post-attention/post-feedforward norms, √hidden "
                       "embedding scale, sliding-window layers"),
    Architecture("phi3", ("phi3",), FUSED, tied_default=False, head_dim_from_config=False,
                 notes="fused qkv_proj and gate_up_proj"),
)
_BY_TYPE = {t: a for a in ARCHITECTURES for t in a.model_types}
_BY_MODULE = {a.name: a for a in ARCHITECTURES}
#: the model_type values dupstudio opens
SUPPORTED_MODEL_TYPES = tuple(t for a in ARCHITECTURES for t in a.model_types)
LLAMA = _BY_MODULE["llama"]
#: every matrix name of every architecture (sidecar tensor names)
ALL_MATRIX_NAMES = tuple(dict.fromkeys(m.name for a in ARCHITECTURES for m in a.matrices))
#: matrix name -> its path under the block (names mean the same place in every architecture)
MATRIX_PATHS = {m.name: m.path for a in ARCHITECTURES for m in a.matrices}


def supported_text() -> str:
    return ", ".join(SUPPORTED_MODEL_TYPES)


def for_model_type(model_type, where: str = "") -> Architecture:
    """The architecture of a config.json ``model_type``; a refusal names it and lists the
    supported ones."""
    a = _BY_TYPE.get(model_type) if isinstance(model_type, str) else None
    if a is None:
        prefix = f"{where}: " if where else ""
        raise DupstudioError(f"{prefix}unsupported architecture {model_type!r} (dupstudio "
                             f"supports: {supported_text()})")
    return a


def of_config(config: dict) -> Architecture:
    return for_model_type(config.get("model_type"))


def of_shape(shape: dict) -> Architecture:
    """The architecture of a ``model_io.model_shape`` dict, for its matrix list and shapes:
    llama's when it does not say or names a type dupstudio does not open (a shape described
    from any config.json, as the roofline does, is read in llama's terms)."""
    return _BY_TYPE.get(shape.get("architecture") or "llama", LLAMA)


def of_args(args) -> Architecture:
    return for_model_type(getattr(args, "model_type", None) or "llama")


def of_model(model) -> Architecture:
    """The architecture of an mlx-lm model (or a DupModel)."""
    args = getattr(model, "args", None)
    mt = getattr(args, "model_type", None) or getattr(model, "model_type", None)
    return for_model_type(mt)


def of_layer(layer) -> Architecture:
    """The architecture of a decoder block, from the mlx-lm module its class comes from."""
    mod = type(layer).__module__.rsplit(".", 1)[-1]
    a = _BY_MODULE.get(mod)
    if a is None:
        raise DupstudioError(f"a decoder block of class {type(layer).__module__}."
                             f"{type(layer).__name__} is not one dupstudio knows (it supports: "
                             f"{supported_text()})")
    return a


# --------------------------------------------------------------------------- module surgery
def get_module(root, path: str):
    mod = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


def set_module(root, path: str, value) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent) if parent else root, name, value)


def clone(module):
    """A copy of ``module``'s structure (every sub-module copied, parameter arrays shared):
    replacing a sub-module or an array of the copy leaves the original untouched, and nothing is
    computed or allocated."""
    import mlx.nn as nn

    def cp(v):
        if isinstance(v, nn.Module):
            new = copy.copy(v)
            for key, val in v.items():
                new[key] = cp(val)
            object.__setattr__(new, "_no_grad", set(getattr(v, "_no_grad", ())))
            return new
        if isinstance(v, list):
            return [cp(x) for x in v]
        if isinstance(v, tuple):
            return tuple(cp(x) for x in v)
        if isinstance(v, dict):
            return {k: cp(x) for k, x in v.items()}
        return v

    return cp(module)


def cast_floating(module, dtype) -> None:
    """Cast ``module``'s floating-point parameters to ``dtype`` (lazily: an array that is
    replaced before use is never computed)."""
    import mlx.core as mx
    from mlx.utils import tree_map

    module.update(tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating)
                           and a.dtype != dtype else a, module.parameters()))


def linear_bias(module):
    """The bias of a linear layer, or None."""
    return module.get("bias") if isinstance(module, dict) else None


def block_linears(model) -> list:
    """Per decoder block, the float linear weights (out, in) keyed by the architecture's
    matrix names."""
    arch = of_model(model)
    return [{m.name: get_module(layer, m.path).weight for m in arch.matrices}
            for layer in model.model.layers]


def is_tied(model) -> bool:
    """Whether the head is the embedding (mlx-lm decides per architecture: a config flag, or,
    for Gemma 3, whether the weights hold an ``lm_head``)."""
    return "lm_head" not in model


def other_block_params(layer, arch: Optional[Architecture] = None) -> dict:
    """A block's parameters other than the quantized matrices' weights and the column-gain
    norms' weights (e.g. Gemma's post-attention norm, qwen3's q/k norms, linear biases), by
    dotted name."""
    from mlx.utils import tree_flatten

    arch = arch or of_layer(layer)
    skip = {f"{m.path}.weight" for m in arch.matrices}
    skip |= {f"{n}.weight" for n in arch.col_norms.values()}
    return {k: v for k, v in tree_flatten(layer.parameters()) if k not in skip}
