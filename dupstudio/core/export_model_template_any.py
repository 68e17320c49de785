"""Replicated decoder for mlx-lm, any architecture, written by dupstudio's exporter.

This file is copied into an exported model folder (as ``dupstudio_model.py``) and named by
config.json's ``model_file``; mlx-lm imports it when loading with ``trust_remote_code=True``
(``--trust-remote-code`` on the command line). It depends only on ``mlx`` and ``mlx-lm``.

The decoder is mlx-lm's own model of the source architecture (config.json's ``dupstudio``
section names its module, e.g. ``qwen3`` or ``gemma3_text``), built from config.json as mlx-lm
builds it, with each decoder block k replaced by K_k copies of that block (replicas). All
replicas of a block share ONE set of packed 2..8-bit codes per matrix; each replica has its own
per-group scales and biases and its own norm weights. With f(x; θ_i) the i-th replica:

* serial:   y_1 = f(h; θ_1);  y_i = y_{i-1} + α_i (f(y_{i-1}; θ_i) - y_{i-1})  (i >= 2)
* parallel: y = h + Σ_i w_i (f(h; θ_i) - h)
* output:   out = h + β (y - h)            β = residual gain (1: unchanged)

The ``dupstudio`` section also carries what the architecture's model does around its blocks and
this file must repeat: the embedding scale (Gemma 3 multiplies the embedding by √hidden rounded
through bfloat16) and each block's sliding window (null: full attention), and where each
quantized matrix sits in a block. Each replica pass keeps its own KV cache (a rotating one for a
sliding-window block).

Weight layout (model.safetensors):

* ``model.layers.{k}.codes.{matrix}``: the block's shared packed codes (uint32), stored once;
* ``model.layers.{k}.replicas.{i}.{path}.{scales|biases|bias}`` and the replica's norm (and
  other float) weights under ``model.layers.{k}.replicas.{i}.``;
* ``model.embed_tokens.*``, ``model.norm.weight`` and ``lm_head.*`` as in mlx-lm's model.

``sanitize`` points every replica's ``weight`` at the same code array object, so the codes are
held in memory once however many replicas use them.
"""
import copy
import importlib
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache


class ModelArgs:
    """config.json as it is: the base architecture's own ModelArgs is built from it."""

    def __init__(self, config: dict):
        self.config = dict(config)
        self.model_type = config.get("model_type")
        info = self.config.get("dupstudio") or {}
        for key in ("base_module", "blocks", "matrices"):
            if key not in info:
                raise ValueError(f"config.json: the dupstudio section lacks {key!r}")
        self.info = info

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        return cls(params)


def _clone(module):
    """A copy of ``module``'s structure (sub-modules copied, arrays shared): each replica gets
    its own modules, which loading then fills with that replica's weights."""
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


def _get(root, path: str):
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


class ReplicatedBlock(nn.Module):
    """K replicas of one decoder block, serial or parallel, with residual gain β."""

    def __init__(self, replicas: list, spec: dict):
        super().__init__()
        k = int(spec["replicas"])
        self.replicas = replicas
        # underscored: plain settings, not parameters
        self._mode = spec.get("mode", "serial")
        self._gains = [float(g) for g in spec.get("gains", [1.0] * k)]
        self._beta = float(spec.get("residual_gain", 1.0))
        if self._mode not in ("serial", "parallel") or len(self._gains) != k or len(replicas) != k:
            raise ValueError(f"config.json: bad dupstudio block spec {spec}")

    def __call__(self, h: mx.array, mask: Any = None, caches: Optional[list] = None) -> mx.array:
        K = len(self.replicas)
        caches = caches if caches is not None else [None] * K
        if self._mode == "serial":
            y = self.replicas[0](h, mask, caches[0])
            for i in range(1, K):
                z = self.replicas[i](y, mask, caches[i])
                a = self._gains[i]
                y = z if a == 1.0 else y + a * (z - y)
        else:
            acc = None
            for i in range(K):
                d = (self.replicas[i](h, mask, caches[i]) - h) * self._gains[i]
                acc = d if acc is None else acc + d
            y = h + acc
        if self._beta != 1.0:
            y = h + self._beta * (y - h)
        return y


class ReplicatedModel(nn.Module):
    def __init__(self, base_inner, info: dict):
        super().__init__()
        specs = info["blocks"]
        if len(specs) != len(base_inner.layers):
            raise ValueError(f"config.json: dupstudio.blocks has {len(specs)} entries for "
                             f"{len(base_inner.layers)} layers")
        self.embed_tokens = base_inner.embed_tokens
        self.layers = [ReplicatedBlock([_clone(layer) for _ in range(int(s["replicas"]))], s)
                       for layer, s in zip(base_inner.layers, specs)]
        self.norm = base_inner.norm
        windows = info.get("windows") or [None] * len(specs)
        # plain settings, not module state
        object.__setattr__(self, "_windows", [None if w is None else int(w) for w in windows])
        # {"value": v, "dtype": "bfloat16"} or None
        object.__setattr__(self, "_scale", info.get("embedding_scale"))

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        if self._scale:
            h = h * mx.array(self._scale["value"], getattr(mx, self._scale["dtype"])).astype(h.dtype)
        passes = sum(len(b.replicas) for b in self.layers)
        cache = cache if cache is not None else [None] * passes
        masks, j = {}, 0
        for block, w in zip(self.layers, self._windows):
            K = len(block.replicas)
            if w not in masks:  # one mask per window size, from the first such block's cache
                masks[w] = create_attention_mask(h, cache[j], window_size=w)
            h = block(h, masks[w], cache[j:j + K])
            j += K
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        base_mod = importlib.import_module(f"mlx_lm.models.{args.info['base_module']}")
        base = base_mod.Model(base_mod.ModelArgs.from_dict(args.config))
        self.model = ReplicatedModel(base.model, args.info)
        if "lm_head" in base:
            self.lm_head = base.lm_head

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        out = self.model(inputs, cache, input_embeddings)
        if "lm_head" in self:
            return self.lm_head(out)
        return self.model.embed_tokens.as_linear(out)

    def sanitize(self, weights: dict) -> dict:
        """Give every replica's linear layers the block's shared code array (same object); tie
        the head to the embedding when the weights hold none (as mlx-lm's Gemma 3 does)."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if "lm_head" in self and not any(k.startswith("lm_head.") for k in weights):
            self.pop("lm_head")
        matrices = self.args.info["matrices"]
        for k, block in enumerate(self.model.layers):
            for m, path in matrices.items():
                key = f"model.layers.{k}.codes.{m}"
                if key not in weights:
                    continue  # already sanitized
                codes = weights.pop(key)
                for i in range(len(block.replicas)):
                    weights[f"model.layers.{k}.replicas.{i}.{path}.weight"] = codes
        return weights

    @property
    def layers(self) -> list:
        """Every replica pass, in order (one KV cache each)."""
        return [r for b in self.model.layers for r in b.replicas]

    def make_cache(self) -> list:
        return [KVCache() if w is None else RotatingKVCache(max_size=w)
                for b, w in zip(self.model.layers, self.model._windows) for _ in b.replicas]
