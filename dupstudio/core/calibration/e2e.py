"""End-to-end stage: tune every block's scales, biases and replica gains together, codes fixed.

Block-wise calibration matches each block's output in isolation; errors that only matter through
later blocks or the head are invisible to it. This stage runs the whole quantized model and
minimises KL(full precision ‖ quantized) of the next-token distributions over the calibration
sequences, holding some sequences out to choose the best step (early stopping) and to guard the
result: the configuration changes only if the held-out KL went down.

Parametrisation (per replica, per matrix): the effective group scales ``S`` and biases ``B`` of the
configuration as it stands (row/column gains folded in, as the model is built) become
``S·exp(u)`` and ``B + S·d`` with ``u = d = 0`` at the start, exactly the model being evaluated.
Serial α / parallel w are tuned where K > 1; the residual gain β only when asked. Replicas of
``channel`` granularity derive their scales from the primary replica's and have no group values
of their own to store, so blocks holding them keep their scales (their gains are still tuned).

Memory: the whole model with its activations for one batch is held for the backward pass, so
the stage runs in memory only; the streamed path skips it and says so.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from dupstudio.core import adapters, quant
from dupstudio.core.config import Config
from dupstudio.core.jobs import Cancelled, DupstudioError, ensure
from dupstudio.core.model_io import LoadedModel, block_linears, model_shape
from dupstudio.core.replicate import (DupModel, ReplicatedBlock, block_tensors, embedding_modules,
                                      final_norm, make_replica_block, row_multipliers)


class TunableLinear(nn.Module):
    """``x @ (S·exp(u) ⊙ q + B + S·d)ᵀ (+ bias)`` per group; codes, S, B and the linear's own
    bias (qwen2's q/k/v) frozen (underscored names are not parameters in MLX)."""

    def __init__(self, codes: mx.array, scales: mx.array, biases: mx.array, group_size: int,
                 bias: mx.array = None):
        super().__init__()
        out_f, in_f = codes.shape
        self._q = codes.astype(mx.float32).reshape(out_f, in_f // group_size, group_size)
        self._S = scales.astype(mx.float32)
        self._B = biases.astype(mx.float32)
        self._bias = None if bias is None else bias.astype(mx.float32)
        self.u = mx.zeros(self._S.shape)
        self.d = mx.zeros(self._S.shape)

    def effective(self):
        return self._S * mx.exp(self.u), self._B + self._S * self.d

    def __call__(self, x):
        s, b = self.effective()
        w = (s[..., None] * self._q + b[..., None]).reshape(self._q.shape[0], -1)
        return x @ w.T if self._bias is None else x @ w.T + self._bias


class TunableBlock(ReplicatedBlock):
    """A ReplicatedBlock whose gains α/w and β are arrays (trainable)."""

    def __init__(self, replicas, mode, gains, residual_gain):
        super().__init__(replicas, mode, gains, residual_gain)
        self.gain = mx.array(self.gains, dtype=mx.float32)
        self.beta = mx.array(self.residual_gain, dtype=mx.float32)

    def __call__(self, h, mask=None, caches=None):
        g = self.gain
        if self.mode == "serial":
            y = self.replicas[0](h, mask)
            for i in range(1, len(self.replicas)):
                y = y + g[i] * (self.replicas[i](y, mask) - y)
        else:
            y = h
            for i in range(len(self.replicas)):
                y = y + g[i] * (self.replicas[i](h, mask) - h)
        return h + self.beta * (y - h)


@dataclass
class E2EResult:
    kl_before: float  # held-out KL of the configuration as it came in
    kl_after: float  # held-out KL of what is returned (equal to kl_before when not accepted)
    accepted: bool
    steps: int
    best_step: int
    seconds: float
    stopped: str  # "done" or "cancelled"
    curve: list  # (step, training KL)
    held_out: list  # (step, held-out KL)


def tunable_model(loaded: LoadedModel, cfg: Config):
    """The configured model (simulate, float32) with tunable scales/biases/gains; also the list
    of tunable linears per (block, replica, matrix) for writing the result back."""
    args = loaded.model.args
    lin = block_linears(loaded.model)
    blocks, handles = [], {}
    for k, spec in enumerate(cfg.blocks):
        bt = block_tensors(loaded, cfg, k, float_weights=lin[k])
        channel = any(r.granularity == "channel" for r in spec.replica[1:])
        reps = []
        for i in range(spec.replicas):
            blk = make_replica_block(args, bt, i, "simulate", mx.float32)
            if not channel:
                for mat in bt.arch.matrices:
                    m = mat.name
                    tl = TunableLinear(bt.codes[m], bt.scales[i][m], bt.biases[i][m], bt.group_size,
                                       bt.lin_bias[i].get(m))
                    adapters.set_module(blk, mat.path, tl)
                    handles[(k, i, m)] = tl
            reps.append(blk)
        blocks.append(TunableBlock(reps, spec.mode, spec.gains, spec.residual_gain))
    emb, head = embedding_modules(loaded, cfg, "simulate", mx.float32)
    model = DupModel(args, emb, blocks, final_norm(loaded, mx.float32), head)
    model.freeze()
    for tl in handles.values():
        tl.unfreeze(keys=["u", "d"])
    return model, handles


def _unfreeze_gains(model: DupModel, cfg: Config, residual_gain: bool) -> None:
    for b, spec in zip(model.blocks, cfg.blocks):
        if spec.replicas > 1:
            b.unfreeze(keys=["gain"], recurse=False)
        if residual_gain:
            b.unfreeze(keys=["beta"], recurse=False)


def kl_loss(logits_q: mx.array, logits_fp: mx.array) -> mx.array:
    """Mean over tokens of KL(p_fp ‖ p_q)."""
    lp = logits_fp - mx.logsumexp(logits_fp, axis=-1, keepdims=True)
    lq = logits_q - mx.logsumexp(logits_q, axis=-1, keepdims=True)
    return mx.mean(mx.sum(mx.exp(lp) * (lp - lq), axis=-1))


def _grad_mask(model: DupModel, cfg: Config) -> list:
    """Serial α₁ is fixed at 1 (the first pass is the block itself)."""
    return [spec.mode == "serial" and spec.replicas > 1 for spec in cfg.blocks]


def write_back(cfg: Config, model: DupModel, handles: dict, shape: dict = None) -> Config:
    """A copy of ``cfg`` holding the tuned scales/biases (unfolded: the stored row/column gains
    stay as they are and are folded again when the model is built), gains and β. ``shape``
    (model_io.model_shape; default: llama's matrices) says the architecture."""
    out = cfg.copy()
    out.tensors = dict(cfg.tensors)
    arch = adapters.of_shape(shape) if shape else adapters.LLAMA
    for k, spec in enumerate(cfg.blocks):
        bits = cfg.block_quant(k)[0]
        mults = [row_multipliers(cfg.tensors, k, i, arch, shape) for i in range(spec.replicas)]
        for i in range(spec.replicas):
            for m in arch.matrix_names:
                tl = handles.get((k, i, m))
                if tl is None:
                    continue
                s, b = tl.effective()
                mult = mults[i][m]
                if mult is not None:
                    s, b = s / mult[:, None], b / mult[:, None]
                out.tensors[f"b{k}.r{i}.{m}.scales"] = s.astype(mx.float16)
                out.tensors[f"b{k}.r{i}.{m}.biases"] = b.astype(mx.float16)
                if i == 0:
                    codes = tl._q.reshape(tl._q.shape[0], -1).astype(mx.uint8)
                    out.tensors[f"b{k}.{m}.codes"] = quant.pack_codes(codes, bits)
        blk = model.blocks[k]
        gains = [float(v) for v in np.array(blk.gain)]
        if spec.mode == "serial":
            gains[0] = 1.0
        out.blocks[k].gains = gains
        out.blocks[k].residual_gain = float(blk.beta.item())
    return out


def tune_end_to_end(loaded: LoadedModel, cfg: Config, tokens: np.ndarray, *, steps: int,
                    lr: float = 1e-3, batch: int = 4, holdout: float = 0.125,
                    residual_gain: bool = False, seed: int = 0, evals: int = 8,
                    progress=None, cancel=None, on_loss=None) -> tuple[Config, E2EResult]:
    """Return (new configuration, record). ``tokens`` (seqs, len): calibration windows, of which a
    share ``holdout`` (at least one sequence) is held out. ``evals`` held-out checks spread over
    the run pick the best step. Cancelling stops early and keeps the best state so far (guarded)."""
    progress, cancel = ensure(progress, cancel)
    if tokens.ndim != 2 or tokens.shape[0] < 2:
        raise DupstudioError("the end-to-end stage needs at least 2 calibration sequences "
                             "(one is held out)")
    if steps < 1:
        raise DupstudioError("the end-to-end stage needs at least one step")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    n = tokens.shape[0]
    n_hold = max(1, int(round(n * holdout)))
    perm = rng.permutation(n)
    hold, train = np.sort(perm[:n_hold]), np.sort(perm[n_hold:])
    fp = loaded.model
    model, handles = tunable_model(loaded, cfg)
    _unfreeze_gains(model, cfg, residual_gain)
    serial_fixed = _grad_mask(model, cfg)
    toks = mx.array(tokens)

    def loss_fn(mdl, x, ref):
        return kl_loss(mdl(x), ref)

    vg = nn.value_and_grad(model, loss_fn)

    def held_out_kl():
        tot = 0.0
        for i in range(0, n_hold, batch):
            x = toks[mx.array(hold[i:i + batch])][:, :-1]
            tot += float(kl_loss(model(x), fp(x)).item()) * x.shape[0]
        return tot / n_hold

    opt = optim.Adam(learning_rate=lr)
    kl_start = held_out_kl()
    best = (kl_start, model.trainable_parameters(), 0)
    every = max(1, steps // max(1, evals))
    curve, held = [], [(0, kl_start)]
    stopped, done = "done", 0
    progress(0.0, f"end-to-end: held-out KL {kl_start:.4g} at the start")
    try:
        for step in range(steps):
            cancel.check()
            idx = rng.choice(train, size=min(batch, len(train)), replace=False)
            x = toks[mx.array(np.sort(idx))][:, :-1]
            ref = fp(x)
            loss, grads = vg(model, x, ref)
            for b, fixed in zip(grads["blocks"], serial_fixed):
                if fixed and "gain" in b:
                    b["gain"] = b["gain"] * mx.array([0.0] + [1.0] * (b["gain"].size - 1))
            opt.update(model, grads)
            mx.eval(model.trainable_parameters(), opt.state, loss)
            done = step + 1
            lv = float(loss.item())
            curve.append((done, lv))
            if on_loss:
                on_loss(-1, step, lv)
            if done % every == 0 or done == steps:
                h = held_out_kl()
                held.append((done, h))
                if h < best[0]:
                    best = (h, tree_map(lambda a: a, model.trainable_parameters()), done)
            el = time.perf_counter() - t0
            eta = el / done * (steps - done)
            progress(done / steps, f"end-to-end: step {done}/{steps}, KL {lv:.4g}, "
                     f"best held-out {best[0]:.4g} (about {eta:.0f} s left)")
    except Cancelled:
        stopped = "cancelled"
    accepted = best[0] < kl_start
    if accepted:
        model.update(best[1])
        new = write_back(cfg, model, handles, model_shape(loaded.config))
    else:
        new = cfg.copy()
        new.tensors = dict(cfg.tensors)
    rec = E2EResult(kl_start, best[0] if accepted else kl_start, accepted, done, best[2],
                    time.perf_counter() - t0, stopped, curve, held)
    return new, rec


def n_tunable(model: DupModel) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
