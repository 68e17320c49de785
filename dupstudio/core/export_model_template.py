"""Replicated llama decoder for mlx-lm, written by dupstudio's exporter.

This file is copied into an exported model folder (as ``dupstudio_llama.py``) and named by
config.json's ``model_file``; mlx-lm imports it when loading with ``trust_remote_code=True``
(``--trust-remote-code`` on the command line). It depends only on ``mlx`` and ``mlx-lm``.

Each decoder block k runs K_k replicas of an ordinary llama block. All replicas of a block
share ONE set of packed 2..8-bit codes per matrix; each replica has its own per-group scales
and biases and its own RMSNorm weights. With f(x; θ_i) the i-th replica's llama block:

* serial:   y_1 = f(h; θ_1);  y_i = y_{i-1} + α_i (f(y_{i-1}; θ_i) - y_{i-1})  (i >= 2)
* parallel: y = h + Σ_i w_i (f(h; θ_i) - h)
* output:   out = h + β (y - h)            β = residual gain (1: unchanged)

The per-block K, mode, gains (α or w) and β are read from config.json's ``dupstudio``
section. Each replica pass keeps its own KV cache (``make_cache`` returns one per pass).

Weight layout (model.safetensors):

* ``model.layers.{k}.codes.{matrix}``: the block's shared packed codes (uint32), stored once;
* ``model.layers.{k}.replicas.{i}.{self_attn|mlp}.{matrix}.{scales|biases}``: replica i;
* ``model.layers.{k}.replicas.{i}.{input_layernorm|post_attention_layernorm}.weight``;
* ``model.embed_tokens.*``, ``model.norm.weight`` and ``lm_head.*`` as in mlx-lm's llama.

``sanitize`` points every replica's ``weight`` at the same code array object, so the codes
are held in memory once however many replicas use them.
"""
from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

MATRICES = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}


@dataclass
class ModelArgs(llama.ModelArgs):
    # {"format": 1, "blocks": [{"replicas": K, "mode": "serial"|"parallel",
    #                           "gains": [...], "residual_gain": β}, ...]}
    dupstudio: Optional[dict] = None

    def block_specs(self) -> list:
        blocks = (self.dupstudio or {}).get("blocks")
        if blocks is None:
            return [{"replicas": 1, "mode": "serial", "gains": [1.0], "residual_gain": 1.0}
                    ] * self.num_hidden_layers
        if len(blocks) != self.num_hidden_layers:
            raise ValueError(f"config.json: dupstudio.blocks has {len(blocks)} entries for "
                             f"{self.num_hidden_layers} layers")
        return blocks


class ReplicatedBlock(nn.Module):
    """K replicas of one llama decoder block, serial or parallel, with residual gain β."""

    def __init__(self, args: ModelArgs, spec: dict):
        super().__init__()
        k = int(spec["replicas"])
        self.replicas = [llama.TransformerBlock(args) for _ in range(k)]
        # underscored: plain settings, not parameters
        self._mode = spec.get("mode", "serial")
        self._gains = [float(g) for g in spec.get("gains", [1.0] * k)]
        self._beta = float(spec.get("residual_gain", 1.0))
        if self._mode not in ("serial", "parallel") or len(self._gains) != k:
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


class ReplicatedLlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.vocab_size = args.vocab_size
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [ReplicatedBlock(args, s) for s in args.block_specs()]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        passes = sum(len(b.replicas) for b in self.layers)
        cache = cache if cache is not None else [None] * passes
        mask = create_attention_mask(h, cache[0])
        j = 0
        for block in self.layers:
            K = len(block.replicas)
            h = block(h, mask, cache[j:j + K])
            j += K
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = ReplicatedLlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        out = self.model(inputs, cache, input_embeddings)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(out)
        return self.lm_head(out)

    def sanitize(self, weights: dict) -> dict:
        """Give every replica's linear layers the block's shared code array (same object)."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        for k, block in enumerate(self.model.layers):
            for m, parent in MATRICES.items():
                key = f"model.layers.{k}.codes.{m}"
                if key not in weights:
                    continue  # already sanitized
                codes = weights.pop(key)
                for i in range(len(block.replicas)):
                    weights[f"model.layers.{k}.replicas.{i}.{parent}.{m}.weight"] = codes
        return weights

    @property
    def layers(self) -> list:
        """Every replica pass, in order (one KV cache each)."""
        return [r for b in self.model.layers for r in b.replicas]

    def make_cache(self) -> list:
        return [KVCache() for _ in self.layers]
