"""Build a runnable MLX model from (base model, configuration).

Two modes:

* ``simulate``: every replica's weights are dequantized ("fake-quant") into ordinary
  ``nn.Linear`` layers in the compute dtype. Fast on any backend; used for calibration and
  perplexity.
* ``deploy``: real packed ``nn.QuantizedLinear`` layers. All replicas of a block reference
  the *same* packed code arrays (no copy) and hold only their own scales and biases.

Both produce the same logits within float tolerance, because both use the same fp16-rounded
scales and biases (stored as float16, as deployed, even when computing in float32).

The block semantics are documented in :mod:`dupstudio.core.config`.

Every replica is the architecture's own mlx-lm decoder block (a structural copy of the base
model's block k, see :func:`dupstudio.core.adapters.clone`) whose linear layers are swapped for
dequantized or packed ones and whose column-gain norms get the replica's weights; attention,
rotary embedding, the other norms and sliding windows stay mlx-lm's. The architecture-specific
facts (matrix list, norms, embedding scale, windows) come from :mod:`dupstudio.core.adapters`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from dupstudio.core import adapters, quant
from dupstudio.core.config import COL_GROUPS, Config
from dupstudio.core.jobs import CancelToken, DupstudioError, ProgressFn, ensure
from dupstudio.core.model_io import LoadedModel, model_shape

MODES = ("simulate", "deploy")


# --------------------------------------------------------------------------- replica math
def lsq_refit(w: mx.array, codes: mx.array, group_size: int, fallback_s: mx.array,
              fallback_b: mx.array):
    """Per group least squares of (scale, bias) to the float weights given fixed codes."""
    out, inn = w.shape
    G = inn // group_size
    q = codes.astype(mx.float32).reshape(out, G, group_size)
    x = w.astype(mx.float32).reshape(out, G, group_size)
    mq, mw = q.mean(-1), x.mean(-1)
    cov = (q * x).mean(-1) - mq * mw
    var = (q * q).mean(-1) - mq * mq
    ok = var > 1e-12
    s = mx.where(ok, cov / mx.where(ok, var, 1.0), fallback_s)
    b = mx.where(ok, mw - s * mq, fallback_b)
    return s, b


def replica_init(spec, w, codes, s0, b0, bits, group_size):
    """Initial per-group (scale, bias) of a non-primary replica with 'group' granularity."""
    args = spec.init_args or {}
    if spec.init == "copy":
        return s0, b0
    if spec.init == "lsq":
        return lsq_refit(w, codes, group_size, s0, b0)
    if spec.init == "gamma":
        g = float(args.get("gamma", 0.9))
        centre = b0 + s0 * ((2 ** bits - 1) / 2.0)
        return g * s0, centre - g * s0 * ((2 ** bits - 1) / 2.0)
    if spec.init == "offset":
        f = float(args.get("fraction", 0.25))
        return s0, b0 + f * s0
    if spec.init == "strategy":
        a = dict(args)
        name = a.pop("strategy", "percentile")
        p = quant.compute_params(w, bits, group_size, name, **a)
        return p.scales, p.biases
    raise DupstudioError(f"unknown replica initialisation {spec.init!r}")


@dataclass
class BlockTensors:
    """Everything needed to materialise one block's replicas."""
    codes: dict  # matrix -> uint8 codes (out, in)
    packed: dict  # matrix -> packed uint32 (shared by all replicas)
    scales: list  # per replica: matrix -> fp16-rounded effective scales (row/col gains folded)
    biases: list
    norms: list  # per replica: column-gain norm path (e.g. "input_layernorm") -> its weight
    bits: int
    group_size: int
    #: per replica: matrix -> the linear's own (float) bias with the row gains folded, for the
    #: matrices that have one (qwen2's q/k/v)
    lin_bias: list = None
    template: object = None  # the base model's decoder block k (its structure is copied)
    arch: object = None  # adapters.Architecture


def _f16(a: mx.array) -> mx.array:
    return a.astype(mx.float16)


def fold_vector(cg: mx.array, start: int, out: int) -> mx.array:
    """A column gain placed on rows [start, start + len) of a matrix with ``out`` rows (ones
    elsewhere): the whole vector when the gain covers every row."""
    if start == 0 and cg.shape[0] == out:
        return cg
    parts = [mx.ones((start,), cg.dtype)] if start else []
    parts.append(cg)
    rest = out - start - cg.shape[0]
    if rest:
        parts.append(mx.ones((rest,), cg.dtype))
    return mx.concatenate(parts)


def row_multipliers(t: dict, k: int, i: int, arch=None, shape: Optional[dict] = None) -> dict:
    """Per matrix of replica i of block k, the factor its rows' scales and biases are multiplied
    by when the model is built (row gain, times the column gain of o_proj folded into the value
    rows and of down_proj folded into the up rows), or None. ``arch`` (default llama) and
    ``shape`` (model_io.model_shape; needed where those rows are part of a fused matrix)."""
    arch = arch or adapters.LLAMA
    folds = {}
    for g in ("o", "down"):
        cg = t.get(f"b{k}.r{i}.col.{g}")
        if cg is None:
            continue
        cg = cg.astype(mx.float32)
        if shape is None:  # the gain covers all rows of a matrix of its own (llama)
            name = arch.fold_matrix(g)
            folds[name] = cg if name not in folds else folds[name] * cg
            continue
        name, start, _ = arch.fold_rows(g, shape)
        vec = fold_vector(cg, start, arch.dims(shape)[name][0])
        folds[name] = vec if name not in folds else folds[name] * vec
    out = {}
    for m in arch.matrix_names:
        row = t.get(f"b{k}.r{i}.{m}.row_gain")
        mult = None if row is None else row.astype(mx.float32)
        if m in folds:
            mult = folds[m] if mult is None else mult * folds[m]
        out[m] = mult
    return out


def block_tensors(loaded: LoadedModel, cfg: Config, k: int, *,
                  float_weights: Optional[dict] = None) -> BlockTensors:
    """Codes shared by the replicas of block k, and each replica's effective (folded,
    fp16-rounded) scales/biases and norm weights."""
    layer = loaded.model.model.layers[k]
    arch = adapters.of_model(loaded.model)
    names = arch.matrix_names
    spec = cfg.blocks[k]
    bits, g, strategy, sargs = cfg.block_quant(k)
    t = cfg.tensors
    shp = model_shape(loaded.config)
    if float_weights is None:
        from dupstudio.core.model_io import block_linears

        float_weights = block_linears(loaded.model)[k]
    codes, packed, base = {}, {}, {}
    for m in names:
        w = float_weights[m].astype(mx.float32)
        key = f"b{k}.{m}.codes"
        p0 = None
        if key in t:
            packed[m] = t[key]
            codes[m] = quant.unpack_codes(t[key], bits, w.shape[1])
        else:
            p0 = quant.compute_params(w, bits, g, strategy, **sargs)
            codes[m] = quant.quantize_codes(w, p0)
            packed[m] = quant.pack_codes(codes[m], bits)
        if p0 is None:
            p0 = quant.compute_params(w, bits, g, strategy, **sargs)
        base[m] = (w, p0.scales.astype(mx.float32), p0.biases.astype(mx.float32))
    scales, biases, norms, lin_bias = [], [], [], []
    norm_w = {grp: adapters.get_module(layer, path).weight for grp, path in arch.col_norms.items()}
    lin_b = {m.name: adapters.linear_bias(adapters.get_module(layer, m.path)) for m in arch.matrices}
    for i, rspec in enumerate(spec.replica):
        si, bi = {}, {}
        col = {c: t.get(f"b{k}.r{i}.col.{c}") for c in COL_GROUPS}
        for m in names:
            w, s0, b0 = base[m]
            pre = f"b{k}.r{i}.{m}"
            if f"{pre}.scales" in t:
                s, b = t[f"{pre}.scales"].astype(mx.float32), t[f"{pre}.biases"].astype(mx.float32)
            elif i == 0:
                s, b = s0, b0
            elif rspec.granularity == "channel":
                s1 = scales_raw[0][m]
                b1 = biases_raw[0][m]
                a = t.get(f"{pre}.ch_scale")
                c = t.get(f"{pre}.ch_offset")
                a = mx.ones((w.shape[0],)) if a is None else a.astype(mx.float32)
                c = mx.zeros((w.shape[0],)) if c is None else c.astype(mx.float32)
                s, b = s1 * a[:, None], b1 * a[:, None] + c[:, None]
            else:
                s, b = replica_init(rspec, w, codes[m], s0, b0, bits, g)
            si[m], bi[m] = s, b
        if i == 0:
            scales_raw, biases_raw = [dict(si)], [dict(bi)]
        # fold row gains and tied column gains into the row scales/biases (and a linear's own
        # bias, which scales with its rows)
        mults = row_multipliers(t, k, i, arch, shp)
        lb = {}
        for m in names:
            mult = mults[m]
            if mult is not None:
                si[m] = si[m] * mult[:, None]
                bi[m] = bi[m] * mult[:, None]
            si[m], bi[m] = _f16(si[m]), _f16(bi[m])
            if lin_b[m] is not None:
                lb[m] = lin_b[m] if mult is None else lin_b[m] * mult.astype(lin_b[m].dtype)
        nd = {}
        for grp, path in arch.col_norms.items():
            w = norm_w[grp]
            nd[path] = w if col[grp] is None else arch.fold_norm(w, col[grp].astype(w.dtype))
        scales.append(si)
        biases.append(bi)
        norms.append(nd)
        lin_bias.append(lb)
    return BlockTensors(codes=codes, packed=packed, scales=scales, biases=biases, norms=norms,
                        bits=bits, group_size=g, lin_bias=lin_bias, template=layer, arch=arch)


# --------------------------------------------------------------------------- modules
class ReplicatedBlock(nn.Module):
    """K replicas of one decoder block (serial or parallel), each the architecture's mlx-lm
    block whose linears share one set of codes. Gains are plain Python floats (not
    parameters)."""

    def __init__(self, replicas: list, mode: str, gains: list, residual_gain: float):
        super().__init__()
        self.replicas = replicas
        self.mode = mode
        self.gains = [float(x) for x in gains]
        self.residual_gain = float(residual_gain)

    def __call__(self, h, mask=None, caches=None):
        K = len(self.replicas)
        if caches is None:
            caches = [None] * K
        if self.mode == "serial":
            y = self.replicas[0](h, mask, caches[0])
            for i in range(1, K):
                z = self.replicas[i](y, mask, caches[i])
                a = self.gains[i]
                y = z if a == 1.0 else y + a * (z - y)
        else:
            acc = None
            for i in range(K):
                d = self.replicas[i](h, mask, caches[i]) - h
                d = d * self.gains[i]
                acc = d if acc is None else acc + d
            y = h + acc
        if self.residual_gain != 1.0:
            y = h + self.residual_gain * (y - h)
        return y


class DupModel(nn.Module):
    """A decoder (any architecture of :mod:`dupstudio.core.adapters`) whose blocks are
    ReplicatedBlocks, run as the architecture's mlx-lm model runs its blocks: the embedding
    (scaled where the architecture scales it), one attention mask per window size, the final
    norm and the head (the embedding's when no ``lm_head`` is given). Compatible with mlx-lm's
    ``stream_generate``: ``make_cache`` gives one KV cache per replica pass (a rotating one for
    a sliding-window block)."""

    def __init__(self, args, embed_tokens, blocks, norm, lm_head=None):
        super().__init__()
        self.args = args
        self.model_type = getattr(args, "model_type", "llama")
        arch = adapters.of_args(args)
        # plain settings, not module state
        object.__setattr__(self, "_arch", arch)
        object.__setattr__(self, "_windows", [arch.block_window(args, k) for k in range(len(blocks))])
        self.embed_tokens = embed_tokens
        self.blocks = blocks
        self.norm = norm
        if lm_head is not None:
            self.lm_head = lm_head

    @property
    def layers(self):
        return [r for b in self.blocks for r in b.replicas]

    @property
    def num_passes(self) -> int:
        return sum(len(b.replicas) for b in self.blocks)

    def make_cache(self):
        return [self._arch.make_block_cache(self.args, k)
                for k, b in enumerate(self.blocks) for _ in b.replicas]

    def hidden(self, inputs, cache=None, input_embeddings=None):
        h = self.embed_tokens(inputs) if input_embeddings is None else input_embeddings
        h = self._arch.scale_embeddings(h, self.args)
        if cache is None:
            cache = [None] * self.num_passes
        masks = {}  # window -> mask, from the first cache of the first block with that window
        j = 0
        for b, w in zip(self.blocks, self._windows):
            K = len(b.replicas)
            if w not in masks:
                masks[w] = create_attention_mask(h, cache[j], window_size=w)
            h = b(h, masks[w], cache[j:j + K])
            j += K
        return self.norm(h)

    def head(self, h):
        if "lm_head" in self:
            return self.lm_head(h)
        return self.embed_tokens.as_linear(h)

    def __call__(self, inputs, cache=None, input_embeddings=None):
        return self.head(self.hidden(inputs, cache, input_embeddings))


def _linear_sim(w: mx.array, dtype) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = w.astype(dtype)
    return lin


def _linear_deploy(packed, scales, biases, in_features, out_features, bits, group_size):
    lin = nn.QuantizedLinear(in_features, out_features, bias=False, group_size=group_size, bits=bits)
    lin.weight = packed
    lin.scales = scales
    lin.biases = biases
    return lin


def _held(a: mx.array, scale_dtype) -> mx.array:
    """Deployed scales / biases in the dtype they are held in (None: as stored, float16)."""
    return a if scale_dtype is None or a.dtype == scale_dtype else a.astype(scale_dtype)


def make_replica_block(args, bt: BlockTensors, i: int, mode: str, dtype, scale_dtype=None):
    """Replica i of the block ``bt`` describes: a structural copy of the base model's block
    (mlx-lm's own class, so its attention, rotary embedding, extra norms and window are the
    architecture's) with the replica's linears and column-gain norms, its other floating-point
    parameters cast to ``dtype``. (``args`` is unused; the block's own structure says it all.)"""
    blk = adapters.clone(bt.template)
    adapters.cast_floating(blk, dtype)  # lazy: the float linears replaced below are never cast
    for mat in bt.arch.matrices:
        m = mat.name
        codes = bt.codes[m]
        out_f, in_f = codes.shape
        if mode == "simulate":
            w = quant.dequantize_codes(codes, bt.scales[i][m].astype(mx.float32),
                                       bt.biases[i][m].astype(mx.float32), bt.group_size)
            lin = _linear_sim(w, dtype)
        else:
            lin = _linear_deploy(bt.packed[m], _held(bt.scales[i][m], scale_dtype),
                                 _held(bt.biases[i][m], scale_dtype),
                                 in_f, out_f, bt.bits, bt.group_size)
        b = (bt.lin_bias[i] if bt.lin_bias else {}).get(m)
        if b is not None:
            lin.bias = b.astype(dtype)
        adapters.set_module(blk, mat.path, lin)
    for path, w in bt.norms[i].items():
        adapters.get_module(blk, path).weight = w.astype(dtype)
    return blk


def final_norm(loaded: LoadedModel, dtype):
    """The base model's final norm (its own class: Gemma's multiplies by 1 + weight) with its
    weight in ``dtype``."""
    norm = adapters.clone(loaded.model.model.norm)
    norm.weight = loaded.model.model.norm.weight.astype(dtype)
    return norm


def embedding_modules(loaded: LoadedModel, cfg: Config, mode: str, dtype, scale_dtype=None):
    """(embed module, lm_head or None) per the configuration's embedding bits (``scale_dtype``: see
    :func:`build`)."""
    tied = adapters.is_tied(loaded.model)
    emb = embedding_from(loaded.model.model.embed_tokens.weight, cfg.embedding, mode, dtype,
                         scale_dtype)
    head = None if tied else head_from(loaded.model.lm_head.weight, cfg.embedding, mode, dtype,
                                       scale_dtype)
    return emb, head


def _q_embed(w, e):
    wq, s, b = mx.quantize(w.astype(mx.float32), e.group_size, e.bits)
    return wq, _f16(s), _f16(b)


def embedding_from(w: mx.array, e, mode: str, dtype, scale_dtype=None):
    """The embedding module of float embedding rows ``w`` (vocab, hidden) per the embedding spec
    ``e`` (its ``bits``, ``group_size``; None: float). Quantization groups lie within a row, so
    the module of a subset of rows holds exactly those rows of the whole one's (streamed
    evaluation builds it a vocabulary chunk at a time)."""
    if e is None or e.bits is None:
        emb = nn.Embedding(*w.shape)
        emb.weight = w.astype(dtype)
    elif mode == "simulate":
        wq, s, b = _q_embed(w, e)
        emb = nn.Embedding(*w.shape)
        emb.weight = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32),
                                   e.group_size, e.bits).astype(dtype)
    else:
        wq, s, b = _q_embed(w, e)
        emb = nn.QuantizedEmbedding(w.shape[0], w.shape[1], e.group_size, e.bits)
        emb.weight, emb.scales, emb.biases = wq, _held(s, scale_dtype), _held(b, scale_dtype)
    return emb


def head_from(hw: mx.array, e, mode: str, dtype, scale_dtype=None):
    """The untied lm_head module of float head rows ``hw`` (vocab, hidden) per the embedding
    spec ``e`` (as :func:`embedding_from`)."""
    if e is None or e.bits is None:
        return _linear_sim(hw, dtype)
    wq, s, b = _q_embed(hw, e)
    if mode == "simulate":
        return _linear_sim(mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32),
                                         e.group_size, e.bits), dtype)
    return _linear_deploy(wq, _held(s, scale_dtype), _held(b, scale_dtype), hw.shape[1],
                          hw.shape[0], e.bits, e.group_size)


def build(loaded: LoadedModel, cfg: Config, mode: str = "simulate", *,
          progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
          dtype=None, scale_dtype=None) -> DupModel:
    """Base model + configuration -> runnable DupModel (``simulate`` or ``deploy``).

    ``scale_dtype`` (deploy): the dtype the packed layers hold their scales and biases in. None
    (default): float16, as stored. ``"compute"``: the compute dtype (the same
    fp16-rounded values, lossless), as mlx-lm's own quantization of float32 weights holds them:
    with float32 activations MLX otherwise casts every float16 scale and bias array at every call
    (two extra ops per quantized matmul, ~7% of a decode step of the default model on the CPU
    backend), at the price of twice the scale/bias memory. No effect when the compute dtype is
    float16 (Metal)."""
    from dupstudio.core.config import validate
    from dupstudio.core.model_io import block_linears

    if mode not in MODES:
        raise DupstudioError(f"build mode must be one of {MODES}, got {mode!r}")
    progress, cancel = ensure(progress, cancel)
    validate(cfg, model_shape(loaded.config))
    dtype = dtype or loaded.dtype or mx.float32
    if isinstance(scale_dtype, str):
        if scale_dtype not in ("compute", "float16"):
            raise DupstudioError(f"scale_dtype must be 'compute' or 'float16', got {scale_dtype!r}")
        scale_dtype = dtype if scale_dtype == "compute" else None
    args = loaded.model.args
    lin = block_linears(loaded.model)
    blocks = []
    n = len(cfg.blocks)
    for k in range(n):
        cancel.check()
        bt = block_tensors(loaded, cfg, k, float_weights=lin[k])
        spec = cfg.blocks[k]
        reps = [make_replica_block(args, bt, i, mode, dtype, scale_dtype) for i in range(spec.replicas)]
        blocks.append(ReplicatedBlock(reps, spec.mode, spec.gains, spec.residual_gain))
        mx.eval([r.parameters() for r in reps])
        progress((k + 1) / n, f"built block {k + 1}/{n} ({mode})")
    emb, head = embedding_modules(loaded, cfg, mode, dtype, scale_dtype)
    model = DupModel(args, emb, blocks, final_norm(loaded, dtype), head)
    model.eval()
    mx.eval(model.parameters())
    return model


# --------------------------------------------------------------------------- accounting
def _unique_nbytes(arrays) -> int:
    seen, total = set(), 0
    for a in arrays:
        if id(a) in seen:
            continue
        seen.add(id(a))
        total += a.nbytes
    return total


def deploy_block_bytes(model: DupModel) -> int:
    """Bytes actually held by the decoder blocks' linear layers (shared codes counted once)."""
    from mlx.utils import tree_flatten

    arrays = []
    for b in model.blocks:
        for r in b.replicas:
            for name, a in tree_flatten(r.parameters()):
                if "norm" not in name:
                    arrays.append(a)
    return _unique_nbytes(arrays)


def accounting(cfg: Config, shape: dict) -> dict:
    """Effective bits per weight of the decoder-block linears (codes + every stored value at
    16 bits: scales, biases, per-channel params, gains), bytes, and FLOPs per token relative
    to the base model (K passes per block)."""
    H, I = shape["hidden_size"], shape["intermediate_size"]
    kvd = shape["num_kv_heads"] * shape["head_dim"]
    dims = adapters.of_shape(shape).dims(shape)
    col_len = {"attn": H, "mlp": H, "o": kvd, "down": I}
    t = cfg.tensors
    total_params, total_bits = 0, 0
    per_block = []
    for k, b in enumerate(cfg.blocks):
        bits, g, _, _ = cfg.block_quant(k)
        params = sum(o * i for o, i in dims.values())
        vals = 0
        for i, r in enumerate(b.replica):
            for m, (o, inn) in dims.items():
                if i == 0 or r.granularity == "group":
                    vals += 2 * o * (inn // g)
                else:
                    vals += 2 * o
                if f"b{k}.r{i}.{m}.row_gain" in t:
                    vals += o
            for c, n in col_len.items():
                if f"b{k}.r{i}.col.{c}" in t:
                    vals += n
        vals += (b.replicas - 1 if b.mode == "serial" else b.replicas)  # α or w
        vals += 0 if b.residual_gain == 1.0 else 1
        bits_k = bits * params + 16 * vals
        per_block.append({"index": k, "params": params, "bits_per_weight": bits_k / params,
                          "replicas": b.replicas})
        total_params += params
        total_bits += bits_k
    n = len(cfg.blocks)
    base_flops = 2 * total_params / max(n, 1)
    passes = sum(b.replicas for b in cfg.blocks)
    emb_params = shape["vocab_size"] * H
    if cfg.embedding.bits is None:
        emb_bits = 16 * emb_params
    else:
        emb_bits = cfg.embedding.bits * emb_params + 32 * emb_params // cfg.embedding.group_size
    heads = 1 if shape.get("tied_embeddings", True) else 2
    return {
        "bits_per_weight": total_bits / total_params,
        "block_linear_params": total_params,
        "block_linear_bytes": total_bits / 8,
        "embedding_bits_per_weight": emb_bits / emb_params,
        "embedding_bytes": heads * emb_bits / 8,
        "total_bytes": total_bits / 8 + heads * emb_bits / 8,
        "passes": passes,
        "flops_ratio": (passes * base_flops + 2 * emb_params) / (n * base_flops + 2 * emb_params),
        "blocks": per_block,
    }
