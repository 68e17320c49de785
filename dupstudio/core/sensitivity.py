"""Per-block sensitivity: for each decoder block k, the loss when ONLY block k is
quantized (KL from full precision on calibration text, all other blocks float), and the gain
when block k alone gets a second, calibrated replica. Shown as bars per block (CLI PNG, GUI).

:func:`sensitivity` computes the same quantities as the straightforward definition
(:func:`sensitivity_reference`: one ``calibrate(blocks=[k])`` and one hybrid-model evaluation per
variant and block) without walking the whole model again for each of them:

* one full-precision walk over the calibration windows feeds every block its FP input ``x`` and
  FP output ``y`` (the calibration targets with ``incremental=False``), handed straight to the
  calibrator's per-block routine;
* one full-precision pass over the KL windows keeps the hidden state entering each requested
  block and the reference log-probabilities; the KL of "only block k changed" then runs only
  block k (quantized), the float blocks after it, the final norm and the head, from the cached
  input of block k (the blocks before k are float, so that input is the hybrid model's own).
"""
from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Callable, Optional

import numpy as np

from dupstudio.core.jobs import CancelToken, DupstudioError, ProgressFn, ensure

COLUMNS = ("block", "kl_quantized", "bits_per_weight", "kl_k1", "kl_k2", "kl_gain", "bits_per_weight_k2",
           "seconds")
KL_BATCH = 4  # windows per forward pass (as evaluate's default batch)


def parse_blocks(spec, num_blocks: int) -> list:
    """Block indices from ``"0,5,10-12"`` (or a list of ints): unique, in the order given.
    Raises DupstudioError naming the bad item."""
    if spec is None:
        return list(range(num_blocks))
    items = spec if isinstance(spec, (list, tuple)) else [s for s in str(spec).replace(" ", "").split(",") if s]
    out: list = []
    for it in items:
        try:
            if isinstance(it, str) and "-" in it.strip("-"):
                a, b = it.split("-", 1)
                ks = list(range(int(a), int(b) + 1))
                if int(b) < int(a):
                    raise ValueError
            else:
                ks = [int(it)]
        except ValueError:
            raise DupstudioError(f"blocks: {it!r} is not a block number or range like 3-7") from None
        for k in ks:
            if not 0 <= k < num_blocks:
                raise DupstudioError(f"blocks: {k} is not a block of this model (0-{num_blocks - 1})")
            if k not in out:
                out.append(k)
    if not out:
        raise DupstudioError("blocks: no block given")
    return out


def _range_progress(progress, lo, hi, prefix=""):
    def f(frac, msg):
        progress(None if frac is None else lo + (hi - lo) * max(0.0, min(1.0, frac)), prefix + msg)
    return f


class _KLCache:
    """Full-precision hidden states entering each wanted block and reference log-probs on the
    KL windows (batches of :data:`KL_BATCH`), computed once."""

    def __init__(self, loaded, windows: np.ndarray, wanted, cancel: CancelToken) -> None:
        import mlx.core as mx

        from dupstudio.core import adapters

        self.loaded = loaded
        inner = loaded.model.model
        self.layers = inner.layers
        arch, args = adapters.of_model(loaded.model), loaded.model.args
        self.batches = []  # (per-block masks, {block: hidden}, reference log-probs)
        self.count = 0
        wanted = set(wanted)
        for start in range(0, windows.shape[0], KL_BATCH):
            cancel.check()
            chunk = mx.array(windows[start:start + KL_BATCH])
            inputs = chunk[:, :-1]
            h = arch.scale_embeddings(inner.embed_tokens(inputs), args)
            mask = [arch.block_mask(args, j, h) for j in range(len(self.layers))]
            hs = {}
            for j, layer in enumerate(self.layers):
                if j in wanted:
                    mx.eval(h)
                    hs[j] = h
                h = layer(h, mask[j], None)
            rl = self.logits(h).astype(mx.float32)
            rlogp = rl - mx.logsumexp(rl, axis=-1, keepdims=True)
            mx.eval(rlogp)
            self.batches.append((mask, hs, rlogp))
            self.count += int(inputs.size)

    def logits(self, h):
        m = self.loaded.model
        h = m.model.norm(h)
        if "lm_head" not in m:  # tied
            return m.model.embed_tokens.as_linear(h)
        return m.lm_head(h)

    def kl(self, k: int, block, cancel: CancelToken) -> float:
        """Mean KL(full precision || model with block k replaced by ``block``) per token."""
        import mlx.core as mx

        tot = 0.0
        for mask, hs, rlogp in self.batches:
            cancel.check()
            h = block(hs[k], mask[k])
            for j in range(k + 1, len(self.layers)):
                h = self.layers[j](h, mask[j], None)
            lg = self.logits(h).astype(mx.float32)
            logp = lg - mx.logsumexp(lg, axis=-1, keepdims=True)
            kl = (mx.exp(rlogp) * (rlogp - logp)).sum(-1)
            tot += float(kl.sum().item())
        return tot / self.count


def _sim_block(loaded, cfg, k):
    """Block k of ``cfg`` in simulate mode, as :func:`dupstudio.core.search.hybrid_model` builds it."""
    import mlx.core as mx

    from dupstudio.core.replicate import ReplicatedBlock, block_tensors, make_replica_block

    spec = cfg.blocks[k]
    bt = block_tensors(loaded, cfg, k)
    dtype = loaded.dtype or mx.float32
    reps = [make_replica_block(loaded.model.args, bt, i, "simulate", dtype) for i in range(spec.replicas)]
    blk = ReplicatedBlock(reps, spec.mode, spec.gains, spec.residual_gain)
    blk.eval()
    mx.eval(blk.parameters())
    return blk


def _calibrate_one(loaded, cfg, k, float_w, layer, x, y, settings, progress, cancel):
    """What ``calibrate(loaded, cfg, tokens, settings, blocks=[k])`` with ``incremental=False``
    returns, given block k's FP input ``x`` and output ``y`` on those tokens."""
    from dupstudio.core.calibration.block import calibrate_block
    from dupstudio.core.calibration.checkpoints import record_block

    n = loaded.num_blocks
    out = cfg.copy()
    out.tensors = dict(cfg.tensors)
    rng = np.random.default_rng([settings.seed, k])  # as calibrate() draws for block k

    def prog(frac, msg):  # calibrate reports whole-model fractions: map block k's share to 0-1
        progress(None if frac is None else frac * n - k, msg.removeprefix(f"block {k}: "))

    from dupstudio.core.adapters import of_model

    mask = of_model(loaded.model).causal_mask(loaded.model.args, k, x.shape[1])
    res, t, gains, beta = calibrate_block(loaded, out, k, float_w, layer, x, y, mask, settings, rng,
                                          prog, cancel, None, n)
    record_block(out, k, res, t, gains, beta, settings, None, [])  # no checkpoint, no result list
    return out


def sensitivity(loaded, cfg_base, cal_tokens: np.ndarray, *, settings=None, kl_windows: int = 8,
                replica_mode: str = "serial", with_replica: bool = True,
                blocks: Optional[list] = None, progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelToken] = None, on_row: Optional[Callable[[dict], None]] = None):
    """One row per block: ``kl_quantized`` (only block k quantized per ``cfg_base``, RTN),
    ``kl_k1`` (same, block k calibrated, K=1), ``kl_k2`` (block k with a second calibrated
    replica in ``replica_mode``), ``kl_gain`` = kl_k1 - kl_k2, and the bits/weight each costs.

    Calibration uses full-precision inputs (``incremental=False``): all other blocks are float.
    KL is measured on the first ``kl_windows`` calibration windows. Rows come in the order of
    ``blocks`` (default: every block); ``on_row(row)`` receives each row as it is done (blocks in
    model order). ``df.attrs``: total ``seconds``, ``setup_seconds`` (the
    shared full-precision passes), ``settings``."""
    import mlx.core as mx
    import pandas as pd

    from dupstudio.core.adapters import of_model
    from dupstudio.core.calibration.block import block_forward, chunks, embed_inputs
    from dupstudio.core.config import MODES, validate
    from dupstudio.core.model_io import block_linears, model_shape
    from dupstudio.core.replicate import accounting
    from dupstudio.core.search import _fast

    progress, cancel = ensure(progress, cancel)
    settings = replace(_fast(settings), incremental=False)
    shape = model_shape(loaded.config)
    validate(cfg_base, shape)
    n = loaded.num_blocks
    todo = parse_blocks(blocks, n)
    if replica_mode not in MODES:
        raise DupstudioError(f"replica mode must be serial or parallel, not {replica_mode!r}")
    toks = np.asarray(cal_tokens)
    if toks.ndim != 2 or toks.shape[1] < 16:
        raise DupstudioError("calibration tokens must be (sequences, length ≥ 16)")
    win = toks[: max(1, min(int(kl_windows), len(toks)))]
    t_all = time.perf_counter()
    cancel.check()

    # -- shared: FP hidden states at the wanted block inputs and reference log-probs (KL windows)
    setup = 0.05
    progress(0.0, f"full-precision pass over {len(win)} KL window(s)")
    kc = _KLCache(loaded, win, todo, cancel)

    # -- per block, in model order (one FP walk over the calibration windows feeds them all)
    order = sorted(todo)
    share = (1.0 - setup) / len(order)
    pos = {k: i for i, k in enumerate(order)}
    rows = {}
    lin = block_linears(loaded.model) if with_replica else None
    layers = loaded.model.model.layers
    bs = settings.batch
    x = None
    if with_replica:
        x = embed_inputs(loaded, loaded.model.model.embed_tokens, mx.array(toks))
        mx.eval(x)
    setup_s = time.perf_counter() - t_all
    for k in range(order[-1] + 1):
        cancel.check()
        y = None
        if with_replica:
            t0 = time.perf_counter()
            mask = of_model(loaded.model).causal_mask(loaded.model.args, k, x.shape[1])
            y = mx.concatenate([block_forward(layers[k], x[sl], mask) for sl in chunks(x.shape[0], bs)])
            mx.eval(y)
            if k not in pos:
                setup_s += time.perf_counter() - t0
        if k not in pos:
            x = y
            continue
        t0 = time.perf_counter()
        lo = setup + pos[k] * share
        progress(lo, f"block {k}: only this block quantized")
        row = {"block": k}
        rtn = cfg_base.copy()
        row["kl_quantized"] = kc.kl(k, _sim_block(loaded, rtn, k), cancel)
        row["bits_per_weight"] = accounting(rtn, shape)["blocks"][k]["bits_per_weight"]
        if with_replica:
            sp = _range_progress(progress, lo + share * 0.1, lo + share * 0.5, f"block {k} K=1: ")
            c1 = _calibrate_one(loaded, rtn, k, lin[k], layers[k], x, y, settings, sp, cancel)
            row["kl_k1"] = kc.kl(k, _sim_block(loaded, c1, k), cancel)
            c2 = cfg_base.copy()
            c2.blocks[k].set_replicas(2, replica_mode)
            sp = _range_progress(progress, lo + share * 0.55, lo + share * 0.95, f"block {k} K=2: ")
            c2 = _calibrate_one(loaded, c2, k, lin[k], layers[k], x, y, settings, sp, cancel)
            row["kl_k2"] = kc.kl(k, _sim_block(loaded, c2, k), cancel)
            row["kl_gain"] = row["kl_k1"] - row["kl_k2"]
            row["bits_per_weight_k2"] = accounting(c2, shape)["blocks"][k]["bits_per_weight"]
        row["seconds"] = time.perf_counter() - t0
        rows[k] = row
        if on_row is not None:
            on_row(dict(row))
        progress(lo + share, f"block {k}: KL {row['kl_quantized']:.4g}"
                 + (f", second replica gains {row['kl_gain']:.4g}" if with_replica else ""))
        x = y
    del kc
    df = pd.DataFrame([rows[k] for k in todo])
    df.attrs["seconds"] = time.perf_counter() - t_all
    df.attrs["setup_seconds"] = setup_s
    df.attrs["settings"] = asdict(settings)
    df.attrs["kl_windows"] = int(len(win))
    df.attrs["replica_mode"] = replica_mode
    progress(1.0, f"sensitivity of {len(todo)} block(s) in {df.attrs['seconds']:.1f}s")
    return df


def top_gain_blocks(df, n: int) -> list:
    """The ``n`` blocks whose second replica gains most (positive gains only), best first."""
    if "kl_gain" not in df.columns or n <= 0:
        return []
    d = df[df["kl_gain"].notna() & (df["kl_gain"] > 0)].sort_values("kl_gain", ascending=False)
    return [int(b) for b in d["block"].head(int(n))]


def sensitivity_reference(loaded, cfg_base, cal_tokens: np.ndarray, *, settings=None, kl_windows: int = 8,
                          replica_mode: str = "serial", with_replica: bool = True,
                          blocks: Optional[list] = None, progress: Optional[ProgressFn] = None,
                          cancel: Optional[CancelToken] = None):
    """The straightforward (slow) definition :func:`sensitivity` must match: per block and
    variant, ``calibrate(blocks=[k])`` and a full hybrid-model evaluation. Kept for tests."""
    import pandas as pd

    from dupstudio.core.calibrate import calibrate
    from dupstudio.core.replicate import accounting
    from dupstudio.core.search import _fast, _kl_windows, _shape, _sub_progress, calibration_kl, hybrid_model

    progress, cancel = ensure(progress, cancel)
    settings = replace(_fast(settings), incremental=False)
    shape = _shape(loaded)
    n = len(cfg_base.blocks)
    todo = list(range(n)) if blocks is None else list(blocks)
    win = _kl_windows(cal_tokens, kl_windows)
    rows = []
    t_all = time.perf_counter()
    for j, k in enumerate(todo):
        cancel.check()
        t0 = time.perf_counter()
        lo, hi = j / len(todo), (j + 1) / len(todo)
        row = {"block": k}
        rtn = cfg_base.copy()
        row["kl_quantized"] = calibration_kl(loaded, hybrid_model(loaded, rtn, [k]), win, cancel)
        row["bits_per_weight"] = accounting(rtn, shape)["blocks"][k]["bits_per_weight"]
        if with_replica:
            sp = _sub_progress(progress, lo, lo + (hi - lo) / 2, f"block {k} K=1: ")
            c1 = calibrate(loaded, rtn, cal_tokens, settings, blocks=[k], progress=sp, cancel=cancel)
            row["kl_k1"] = calibration_kl(loaded, hybrid_model(loaded, c1, [k]), win, cancel)
            c2 = cfg_base.copy()
            c2.blocks[k].set_replicas(2, replica_mode)
            sp = _sub_progress(progress, lo + (hi - lo) / 2, hi, f"block {k} K=2: ")
            c2 = calibrate(loaded, c2, cal_tokens, settings, blocks=[k], progress=sp, cancel=cancel)
            row["kl_k2"] = calibration_kl(loaded, hybrid_model(loaded, c2, [k]), win, cancel)
            row["kl_gain"] = row["kl_k1"] - row["kl_k2"]
            row["bits_per_weight_k2"] = accounting(c2, shape)["blocks"][k]["bits_per_weight"]
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        progress(hi, f"block {k}: KL {row['kl_quantized']:.4g}")
    df = pd.DataFrame(rows)
    df.attrs["seconds"] = time.perf_counter() - t_all
    df.attrs["settings"] = asdict(settings)
    return df
