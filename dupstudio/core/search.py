"""A budgeted search over per-block replication, and the sweep table (per-block sensitivity
lives in :mod:`dupstudio.core.sensitivity`).

* :func:`search` — per block, the replica count, mode, replica granularity and group size
  (32/64 where it divides) that minimise calibration KL within a bits-per-weight budget (and
  optionally a predicted decode-latency budget): scored candidate moves, greedy by gain per
  cost, calibration of the result (fast preset), then a local refinement pass judged on
  calibration KL. The history is kept in ``provenance["search"]``.
* :func:`sweep` — a list of configurations (RTN 2/3/4-bit, calibrated K=1, K=2 serial and
  parallel, the search result) and mlx-lm peer baselines evaluated on the same windows:
  perplexity (+ bootstrap 95% interval), KL, top-1 agreement, bits/weight, predicted decode
  latency on a hardware profile.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional

import numpy as np

from dupstudio.core.jobs import CancelToken, DupstudioError, ProgressFn, ensure

MOVES = ("g32", "serial-group", "parallel-group", "serial-channel", "parallel-channel")
#: scored by default (parallel-channel on request: parallel never beat serial in our runs)
DEFAULT_MOVES = ("g32", "serial-group", "parallel-group", "serial-channel")
LATENCY_ASSUMPTION = "measured"


# --------------------------------------------------------------------------- helpers
def _shape(loaded) -> dict:
    from dupstudio.core.model_io import model_shape

    return model_shape(loaded.config)


def dividing_group_sizes(shape: dict, sizes=(32, 64, 128)) -> list:
    """Group sizes that divide every block matrix's rows (MLX groups never straddle rows)."""
    rows = [shape["hidden_size"], shape["intermediate_size"], shape["num_heads"] * shape["head_dim"]]
    return [g for g in sizes if all(r % g == 0 for r in rows)]


def base_config(loaded, bits: int = 2, group_size: int = 64):
    from dupstudio.core.config import new_config

    shape = _shape(loaded)
    if group_size not in dividing_group_sizes(shape):
        raise DupstudioError(f"group size {group_size} does not divide this model's rows "
                             f"(use one of {dividing_group_sizes(shape)})")
    return new_config(shape, source=loaded.source if loaded.source != "default" else "",
                      bits=bits, group_size=group_size)


def hybrid_model(loaded, cfg, quantized_blocks):
    """A model whose blocks in ``quantized_blocks`` follow ``cfg`` (simulate mode) and whose
    other blocks, embedding and head stay full precision."""
    import mlx.core as mx
    import mlx.nn as nn

    from dupstudio.core.replicate import DupModel, ReplicatedBlock, block_tensors, make_replica_block

    args = loaded.model.args
    dtype = loaded.dtype or mx.float32
    qb = set(quantized_blocks)
    blocks = []
    for k, layer in enumerate(loaded.model.model.layers):
        if k in qb:
            spec = cfg.blocks[k]
            bt = block_tensors(loaded, cfg, k)
            reps = [make_replica_block(args, bt, i, "simulate", dtype) for i in range(spec.replicas)]
            blocks.append(ReplicatedBlock(reps, spec.mode, spec.gains, spec.residual_gain))
        else:
            blocks.append(ReplicatedBlock([layer], "serial", [1.0], 1.0))
    head = loaded.model.lm_head if "lm_head" in loaded.model else None
    model = DupModel(args, loaded.model.model.embed_tokens, blocks, loaded.model.model.norm, head)
    model.eval()
    mx.eval(model.parameters())
    return model


def calibration_kl(loaded, model, windows: np.ndarray, cancel: Optional[CancelToken] = None,
                   reference=None) -> float:
    """Mean KL(full precision || model) per token on calibration windows (``reference``: a
    :class:`~dupstudio.core.evaluate.CachedReference` of those windows, else the float model)."""
    from dupstudio.core.evaluate import evaluate

    return float(evaluate(model, windows, reference=reference or loaded.model, cancel=cancel).kl)


def _kl_windows(tokens: np.ndarray, n: int) -> np.ndarray:
    return np.asarray(tokens[: max(1, min(n, len(tokens)))])


def _fast(settings=None, **over):
    from dupstudio.core.calibrate import settings_from

    if settings is None:
        return settings_from("fast", **over)
    return replace(settings, **{k: v for k, v in over.items() if v is not None})


def _sub_progress(progress, lo, hi, prefix=""):
    def f(frac, msg):
        progress(None if frac is None else lo + (hi - lo) * frac, prefix + msg)
    return f


def apply_move(cfg, k: int, move: str) -> None:
    """Apply one search move to block k of ``cfg`` (in place)."""
    b = cfg.blocks[k]
    if move == "g32":
        b.group_size = 32
        b.calibration = None
        return
    mode, gran = move.split("-")
    b.set_replicas(2, mode)
    b.replica[1].granularity = gran
    b.replica[1].init = "copy"


def block_bpw_delta(cfg, shape, k, move) -> float:
    from dupstudio.core.replicate import accounting

    c = cfg.copy()
    apply_move(c, k, move)
    return accounting(c, shape)["bits_per_weight"] - accounting(cfg, shape)["bits_per_weight"]


def predicted_latency_ms(cfg, shape, profile="apple-m1-pro", *, fp: bool = False) -> float:
    """Predicted decode latency (ms/token, the profile's float16 deployment, the ``measured``
    cache assumption, floor included) at bench's default settings (128 prompt, 64 generated)."""
    from dupstudio.core.bench import predict_for

    res = predict_for(shape, profile, cfg, fp=fp)
    return float(res.decode[LATENCY_ASSUMPTION].predicted_ms)


def mlx_lm_plans(model, shape, float_bits: int = 16):
    """Roofline plans (blocks, embedding, head) of an mlx-lm model as it is quantized: per block
    the bits and group size of its linears (per-matrix bits where they differ, as in the mixed
    recipes), the embedding's and the head's bits (float modules at ``float_bits``)."""
    import mlx.nn as nn

    from dupstudio.core import roofline as RF

    def bits_group(m):
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return int(m.bits), int(m.group_size)
        return int(float_bits), 64

    from dupstudio.core.adapters import of_model

    names = RF.BLOCK_LINEARS
    arch = of_model(model)
    plans = []
    for k, layer in enumerate(model.layers):
        mods = dict(layer.named_modules())
        got = {}
        for path, m in mods.items():
            leaf = path.rsplit(".", 1)[-1]
            if leaf in arch.matrix_names and isinstance(m, (nn.Linear, nn.QuantizedLinear)):
                for part in arch.llama_parts(leaf):  # a fused matrix: each of its parts
                    got[part] = bits_group(m)
        if set(got) != set(names):
            raise DupstudioError(f"mlx-lm model block {k}: linears {sorted(got)} do not match the llama "
                                 f"shape's {sorted(names)}")
        groups = {g for b, g in got.values() if b < 16}
        bits = [b for b, _ in got.values()]
        if len(groups) > 1 or (min(bits) < 16 <= max(bits)):
            raise DupstudioError(f"mlx-lm model block {k}: mixed group sizes or float and quantized "
                                 "linears in one block are not described by the roofline")
        low = min(bits)
        g = groups.pop() if groups else 64
        mb = {n: b for n, (b, _) in got.items() if b != low} or None
        plans.append(RF.BlockPlan(bits=low, group_size=g, matrix_bits=mb))
    eb, eg = bits_group(model.model.embed_tokens)
    embed = RF.EmbedPlan(bits=eb, group_size=eg)
    head = None
    if getattr(model, "lm_head", None) is not None and not shape["tied_embeddings"]:
        hb, hg = bits_group(model.lm_head)
        head = RF.EmbedPlan(bits=hb, group_size=hg)
    return plans, embed, head


def _predicted_plans_ms(shape, profile, plans, embed, head=None) -> float:
    from dupstudio.core import roofline as RF
    from dupstudio.core.bench import decode_context

    prof = RF.get_profile(profile) if isinstance(profile, str) else profile
    res = RF.predict(shape, plans, prof, embed=embed, head=head, context=decode_context(128, 64),
                     prefill_tokens=128, kv_bytes=2)
    return float(res.decode[LATENCY_ASSUMPTION].predicted_ms)


# --------------------------------------------------------------------------- search
class CalibrationCache:
    """Calibrated configurations of one run, keyed by what determines them (configuration
    content, calibration tokens, settings): the sweep and its searches never calibrate the same
    thing twice (e.g. a search whose budget admits no move returns the calibrated base)."""

    def __init__(self):
        self._d = {}
        self.hits = 0

    @staticmethod
    def key(cfg, tokens: np.ndarray, settings, blocks=None) -> str:
        import hashlib
        import json

        h = hashlib.sha256()
        d = cfg.to_dict()
        d.pop("provenance", None)
        d.pop("results", None)
        for b in d.get("blocks", []):
            b.pop("calibration", None)
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
        for name in sorted(cfg.tensors):
            h.update(name.encode())
            h.update(np.array(cfg.tensors[name]).tobytes())
        h.update(np.ascontiguousarray(tokens).astype(np.int64).tobytes())
        h.update(settings.key().encode())
        h.update(repr(None if blocks is None else sorted(blocks)).encode())
        return h.hexdigest()

    def calibrate(self, loaded, cfg, tokens, settings, *, blocks=None, progress=None, cancel=None):
        from dupstudio.core.calibrate import calibrate

        k = self.key(cfg, tokens, settings, blocks)
        if k in self._d:
            self.hits += 1
            if progress:
                progress(1.0, "reused an identical calibration from this run")
            return self._d[k].copy()
        out = calibrate(loaded, cfg, tokens, settings, blocks=blocks, progress=progress, cancel=cancel)
        self._d[k] = out.copy()
        return out


def _block_output_power(loaded, tokens: np.ndarray, batch: int = 4) -> list:
    """mean(y²) of each full-precision block's output on ``tokens`` (one walk): the scale that
    turns a block's output MSE into a relative error comparable across depths."""
    import mlx.core as mx

    from dupstudio.core.adapters import of_model
    from dupstudio.core.calibration.block import block_forward, chunks, embed_inputs

    x = embed_inputs(loaded, loaded.model.model.embed_tokens, mx.array(tokens))
    arch = of_model(loaded.model)
    out = []
    for k, layer in enumerate(loaded.model.model.layers):
        mask = arch.causal_mask(loaded.model.args, k, x.shape[1])
        x = mx.concatenate([block_forward(layer, x[sl], mask) for sl in chunks(x.shape[0], batch)])
        mx.eval(x)
        out.append(float(mx.mean(x * x).item()))
    return out


def score_moves(loaded, base, tokens: np.ndarray, score_settings, moves, *, progress=None, cancel=None):
    """Per block and move: the relative block-output error of the base and of the move, scored
    with short calibrations on full-precision inputs (so every block's score is its own). One
    calibration of the base and one per move (the move applied to every block at once).
    Returns a list of dicts (block, move, loss_base, loss, gain)."""
    from dupstudio.core.calibrate import calibrate

    progress, cancel = ensure(progress, cancel)
    st = replace(score_settings, incremental=False)
    n = len(base.blocks)
    power = _block_output_power(loaded, tokens, st.batch)
    stages = len(moves) + 1

    def rel(c):
        return [(b.calibration["loss_after"] / max(power[k], 1e-30)) if b.calibration else math.nan
                for k, b in enumerate(c.blocks)]

    cb = calibrate(loaded, base, tokens, st, progress=_sub_progress(progress, 0, 1 / stages, "score base: "),
                   cancel=cancel)
    lb = rel(cb)
    rows = []
    for i, mv in enumerate(moves):
        cancel.check()
        c = base.copy()
        for k in range(n):
            apply_move(c, k, mv)
        c = calibrate(loaded, c, tokens, st, progress=_sub_progress(progress, (i + 1) / stages, (i + 2) / stages,
                                                                    f"score {mv}: "), cancel=cancel)
        lm = rel(c)
        for k in range(n):
            rows.append({"block": k, "move": mv, "loss_base": lb[k], "loss": lm[k], "gain": lb[k] - lm[k]})
    return rows


def _slot(move: str) -> str:
    return "group" if move == "g32" else "replica"


def search(loaded, cal_tokens: np.ndarray, budget_bpw: float = 2.5, budget_latency_ms: Optional[float] = None,
           profile: str = "apple-m1-pro", *, bits: int = 2, group_size: int = 64, settings=None,
           score_settings=None, moves=DEFAULT_MOVES, kl_windows: int = 8, max_refine: int = 1,
           cache: Optional[CalibrationCache] = None, scores: Optional[list] = None,
           reference=None, progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None):
    """Choose per block the group size, replica count, mode and granularity (and, under a latency
    budget, the embedding bits) that minimise calibration KL within the budget.

    1. Base: K=1, ``bits``, ``group_size`` everywhere (float16 embedding; under a latency budget
       the embedding drops to 8, then 4 bits if the base does not fit otherwise). The base must
       fit the budget.
    2. Score every move of :data:`MOVES` on every block (:func:`score_moves`: short calibrations,
       relative block-output error). Skipped when no move can fit the budget.
    3. Greedy by gain per cost (bits/weight added; plus predicted ms over the latency budget when
       one is set). A block holds at most one group move (g32) and one replica move.
    4. Calibrate the chosen configuration (``settings``; an identical calibration in ``cache`` is
       reused) and measure the KL from full precision on ``kl_windows`` calibration windows.
    5. Refine: up to ``max_refine`` trials on the weakest chosen moves — swap for the next-best
       move of that block, or drop it and spend its bits on the best unchosen move — recalibrating
       only the blocks touched, kept if the calibration KL drops.

    ``scores`` (from an earlier search on the same base/tokens) skips step 2. The history, the
    scores and the choice are kept in ``provenance["search"]``."""
    from dupstudio.core.replicate import accounting, build

    progress, cancel = ensure(progress, cancel)
    cache = cache or CalibrationCache()
    t_start = time.perf_counter()
    shape = _shape(loaded)
    settings = _fast(settings)
    score_settings = score_settings or replace(settings, steps=max(1, settings.steps // 10),
                                               seqs=min(settings.seqs, 4), holdout=0.0)
    n = shape["num_blocks"]
    ok_g = dividing_group_sizes(shape)
    bad = [m for m in moves if m not in MOVES]
    if bad:
        raise DupstudioError(f"unknown search move(s) {bad} (use {', '.join(MOVES)})")
    moves = [m for m in moves if m != "g32" or (32 in ok_g and group_size > 32)]
    base = base_config(loaded, bits, group_size)
    history = []
    base_bpw = accounting(base, shape)["bits_per_weight"]
    if base_bpw > budget_bpw + 1e-9:
        raise DupstudioError(f"budget {budget_bpw} bits/weight is below the base configuration's "
                             f"{base_bpw:.3f} ({bits}-bit g{group_size})")
    base_ms = predicted_latency_ms(base, shape, profile)
    if budget_latency_ms is not None and base_ms > budget_latency_ms:
        for eb in (8, 4):
            base.embedding.bits, base.embedding.group_size = eb, 64
            base_ms = predicted_latency_ms(base, shape, profile)
            history.append({"step": len(history), "phase": "embedding", "embedding_bits": eb, "latency_ms": base_ms})
            if base_ms <= budget_latency_ms:
                break
        else:
            raise DupstudioError(f"latency budget {budget_latency_ms} ms is below the base configuration's "
                                 f"predicted {base_ms:.3f} ms on {profile} even with a 4-bit embedding")
    toks = np.asarray(cal_tokens)
    win = _kl_windows(toks, kl_windows)
    if reference is None:
        from dupstudio.core.evaluate import CachedReference

        reference = CachedReference(loaded.model, win, cancel=cancel)
    stages = 4

    def sp(i, msg):
        return _sub_progress(progress, i / stages, (i + 1) / stages, msg)

    def fits(c):
        bpw = accounting(c, shape)["bits_per_weight"]
        if bpw > budget_bpw + 1e-9:
            return False, bpw, None
        ms = predicted_latency_ms(c, shape, profile)
        if budget_latency_ms is not None and ms > budget_latency_ms + 1e-9:
            return False, bpw, ms
        return True, bpw, ms

    # --- 2. scoring (only if some move can fit at all)
    any_fits = False
    for mv in moves:
        c = base.copy()
        apply_move(c, n - 1, mv)
        any_fits = any_fits or fits(c)[0]
    table = []
    if any_fits:
        if scores is None:
            stoks = toks[: score_settings.seqs]
            scores = score_moves(loaded, base, stoks, score_settings, moves, progress=sp(0, ""), cancel=cancel)
        for r in scores:
            if r["move"] not in moves:
                continue
            one = base.copy()
            apply_move(one, r["block"], r["move"])
            table.append(dict(r, bpw_cost=accounting(one, shape)["bits_per_weight"] - base_bpw,
                              ms_cost=predicted_latency_ms(one, shape, profile) - base_ms))
    else:
        history.append({"step": len(history), "phase": "score", "note": "no move fits the budget: the base is the answer"})

    def ratio(r):
        cost = max(r["bpw_cost"], 0.0)
        if budget_latency_ms is not None:
            cost = cost + max(r["ms_cost"], 0.0) / max(budget_latency_ms, 1e-9)
        return r["gain"] / max(cost, 1e-9)

    # --- 3. greedy
    chosen = {}  # (block, slot) -> move
    cur = base.copy()
    for r in sorted([r for r in table if r["gain"] > 0], key=ratio, reverse=True):
        cancel.check()
        key = (r["block"], _slot(r["move"]))
        if key in chosen:
            continue
        c = cur.copy()
        apply_move(c, r["block"], r["move"])
        ok, bpw, ms = fits(c)
        if ok:
            cur, chosen[key] = c, r["move"]
            history.append({"step": len(history), "phase": "greedy", "block": r["block"], "move": r["move"],
                            "gain": r["gain"], "bpw_cost": r["bpw_cost"], "ms_cost": r["ms_cost"],
                            "bits_per_weight": bpw, "latency_ms": ms})
    sp(1, "")(1.0, f"greedy: {len(chosen)} moves chosen")

    # --- 4. calibrate the choice
    cal = cache.calibrate(loaded, cur, toks, settings, progress=sp(2, "calibrate choice: "), cancel=cancel)
    kl = calibration_kl(loaded, build(loaded, cal, "simulate"), win, cancel, reference=reference)
    history.append({"step": len(history), "phase": "calibrate", "kl": kl,
                    "bits_per_weight": accounting(cal, shape)["bits_per_weight"]})

    # --- 5. refinement
    rp = sp(3, "refine: ")
    trials = 0
    by_key = {}
    for r in table:
        by_key.setdefault((r["block"], _slot(r["move"])), []).append(r)
    gain_of = {(r["block"], r["move"]): r["gain"] for r in table}
    weakest = sorted(chosen.items(), key=lambda kv: gain_of.get((kv[0][0], kv[1]), 0.0))
    unchosen = sorted([r for r in table if r["gain"] > 0 and (r["block"], _slot(r["move"])) not in chosen],
                      key=ratio, reverse=True)
    proposals = []
    for key, mv in weakest:
        alts = sorted([r for r in by_key.get(key, []) if r["move"] != mv and r["gain"] > 0],
                      key=lambda r: r["gain"], reverse=True)
        if alts:
            proposals.append((key, alts[0]["move"], None))
        if unchosen:
            proposals.append((key, None, unchosen[0]))
    for key, new_mv, other in proposals:
        if trials >= max_refine:
            break
        cancel.check()
        k = key[0]
        c = base.copy()
        c.embedding = replace(cur.embedding)
        trial = {kk: vv for kk, vv in chosen.items() if kk != key}
        if new_mv is not None:
            trial[key] = new_mv
        else:
            trial[(other["block"], _slot(other["move"]))] = other["move"]
        for (kb, _), m in sorted(trial.items()):
            apply_move(c, kb, m)
        ok, bpw, ms = fits(c)
        if not ok:
            continue
        trials += 1
        touched = sorted({k} | ({other["block"]} if other else set()))
        rec = {"step": len(history), "phase": "refine", "block": k, "from": chosen[key], "to": new_mv,
               "moved_to": (other["block"], other["move"]) if other else None, "bits_per_weight": bpw,
               "accepted": False}
        # keep the other blocks' calibrated tensors; recalibrate only the touched blocks
        c.tensors = {t: v for t, v in cal.tensors.items() if not any(t.startswith(f"b{j}.") for j in touched)}
        for j, bj in enumerate(c.blocks):
            if j not in touched:
                bj.gains, bj.residual_gain = list(cal.blocks[j].gains), cal.blocks[j].residual_gain
                bj.calibration = cal.blocks[j].calibration
        cc = cache.calibrate(loaded, c, toks, settings, blocks=touched, cancel=cancel)
        kl2 = calibration_kl(loaded, build(loaded, cc, "simulate"), win, cancel, reference=reference)
        rec["kl"] = kl2
        if kl2 < kl:
            rec["accepted"] = True
            cur, cal, kl, chosen = c, cc, kl2, trial
        history.append(rec)
        rp(trials / max(1, max_refine), f"trial {trials}: {'kept' if rec['accepted'] else 'rejected'}")
    acc = accounting(cal, shape)
    cal.provenance = dict(cal.provenance)
    per_block = {}
    for (kb, _), m in sorted(chosen.items()):
        per_block.setdefault(str(kb), []).append(m)
    cal.provenance["search"] = {
        "budget_bpw": budget_bpw, "budget_latency_ms": budget_latency_ms, "profile": profile,
        "bits": bits, "group_size": group_size, "moves": list(moves), "embedding_bits": cal.embedding.bits,
        "settings": asdict(settings), "score_settings": asdict(score_settings),
        "scores": table, "history": history, "chosen": {k: "+".join(v) for k, v in per_block.items()},
        "kl": kl, "kl_windows": int(len(win)), "bits_per_weight": acc["bits_per_weight"],
        "latency_ms": predicted_latency_ms(cal, shape, profile), "seconds": time.perf_counter() - t_start,
    }
    progress(1.0, f"search: {len(per_block)} blocks changed, {acc['bits_per_weight']:.3f} bits/weight, "
             f"calibration KL {kl:.4g}")
    return cal


# --------------------------------------------------------------------------- mlx-lm baselines
def _fresh_mlx_lm(loaded):
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import load_model

    model, _ = load_model(loaded.path, lazy=True)
    dt = loaded.dtype or mx.float32
    model.update(tree_map(lambda a: a.astype(dt) if mx.issubdtype(a.dtype, mx.floating) else a,
                          model.parameters()))
    model.eval()
    return model


def mlx_block_bpw(model) -> float:
    """Bits/weight of the decoder blocks' linears of an mlx-lm model (fp16 scale + bias per group)."""
    import mlx.nn as nn

    bits_total, params = 0.0, 0
    for layer in model.layers:
        for _, m in layer.named_modules():
            if isinstance(m, nn.QuantizedLinear):
                n = m.scales.shape[0] * m.scales.shape[1] * m.group_size
                bits_total += n * m.bits + 32 * n / m.group_size
                params += n
            elif isinstance(m, nn.Linear):
                n = m.weight.size
                bits_total += 16 * n
                params += n
    return bits_total / max(params, 1)


#: mlx-lm quantizers in the default sweep (``awq`` on a reduced calibration set: see mlx_lm_model)
DEFAULT_MLX_LM = (("plain", 2, 64), ("mixed_2_6", 2, 64), ("mixed_3_6", 2, 64),
                  ("gptq", 2, 64), ("gptq", 2, 32), ("awq", 2, 64), ("dwq", 2, 64))


def mlx_lm_model(loaded, cal_tokens, method: str, *, bits: int = 2, group_size: int = 64,
                 awq_seqs: int = 8, awq_grid: int = 5):
    """(name, model or None, info) of one of mlx-lm's own quantizations of the loaded float model.

    ``info``: ``embedding_bits``, ``bits_per_weight`` (block linears), ``note``, ``seconds``,
    ``plans`` (the roofline plans of the quantized model, :func:`mlx_lm_plans`, or None), ``log``
    (the tail of what mlx-lm printed)."""
    import contextlib
    import io

    import mlx.core as mx
    import mlx.nn as nn

    t0 = time.perf_counter()
    buf = io.StringIO()
    model, emb_bits, note = None, None, ""
    if method == "plain":
        name = f"mlx-lm {bits}-bit g{group_size}"
    elif method.startswith("mixed_"):
        name = f"mlx-lm {method} g{group_size}"
    else:
        name = f"mlx-lm {method.upper()} {bits}-bit g{group_size}"
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            if method == "plain":
                model = _fresh_mlx_lm(loaded)
                nn.quantize(model, group_size=group_size, bits=bits)
                emb_bits = bits
                note = "mlx_lm.convert-equivalent (nn.quantize; embedding/head quantized too)"
            elif method.startswith("mixed_"):
                from mlx_lm.convert import mixed_quant_predicate_builder

                model = _fresh_mlx_lm(loaded)
                pred = mixed_quant_predicate_builder(method, model, group_size)

                def cls_pred(path, module, pred=pred):
                    return hasattr(module, "to_quantized") and pred(path, module)

                nn.quantize(model, group_size=group_size, bits=bits, class_predicate=cls_pred)
                emb_bits = getattr(model.model.embed_tokens, "bits", None)
                note = (f"mlx_lm.convert --quant-predicate {method} (some v_proj/down_proj and lm_head at "
                        "high bits)")
            elif method == "gptq":
                from mlx_lm.quant.gptq import gptq_quantize

                model = _fresh_mlx_lm(loaded)
                emb = model.model.embed_tokens
                model, _ = gptq_quantize(model, mx.array(np.asarray(cal_tokens)), bits, group_size, 8,
                                         group_size, batch_size=4)
                model.model.embed_tokens = emb  # keep the float embedding (its fallback would quantize it)
                note = ("mlx_lm.quant.gptq.gptq_quantize on the local calibration tokens (its CLI's "
                        "load_data downloads a calibration text; the function takes tokens); embedding float")
            elif method == "awq":
                from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize

                mt = loaded.config.get("model_type", "llama")
                if mt not in AWQ_MODEL_CONFIGS:
                    raise DupstudioError(f"AWQ has no configuration for model type {mt}")
                model = _fresh_mlx_lm(loaded)
                emb = model.model.embed_tokens
                toks = np.asarray(cal_tokens)[:awq_seqs]
                awq_quantize(model, mx.array(toks), AWQ_MODEL_CONFIGS[mt], group_size=group_size, bits=bits,
                             embed_group_size=group_size, embed_bits=8, n_grid=awq_grid)
                model.model.embed_tokens = emb
                note = (f"mlx_lm.quant.awq.awq_quantize on {len(toks)} local calibration sequences, n_grid "
                        f"{awq_grid} (reduced: ~1 min/block on 2 cores at 32 sequences, n_grid 10); its CLI's "
                        "load_data downloads a calibration text; embedding float")
            elif method == "dwq":
                note = ("not run offline: mlx_lm.quant.dwq's CLI loads its calibration data with "
                        "load_data → a Hugging Face dataset name fetched from the hub, and its "
                        "dwq_quantize is whole-model logit distillation (a training loop, hours on 2 "
                        "cores) that dupstudio does not wire to local text")
            else:
                raise DupstudioError(f"unknown mlx-lm method {method!r}")
            if model is not None:
                mx.eval(model.parameters())
    except Exception as e:  # noqa: BLE001 - a failed baseline is a row that says why
        model, note = None, f"failed: {type(e).__name__}: {e}"
    plans = None
    if model is not None:
        plans = mlx_lm_plans(model, _shape(loaded))
    info = {"embedding_bits": emb_bits, "note": note, "seconds": time.perf_counter() - t0,
            "bits_per_weight": mlx_block_bpw(model) if model is not None else math.nan,
            "plans": plans, "log": buf.getvalue()[-2000:]}
    return name, model, info


def mlx_lm_baselines(loaded, cal_tokens, *, methods=DEFAULT_MLX_LM, progress: Optional[ProgressFn] = None,
                     cancel: Optional[CancelToken] = None, **kw):
    """[(name, model or None, info)] for each (method, bits, group_size) of ``methods``."""
    progress, cancel = ensure(progress, cancel)
    out = []
    for i, (meth, b, g) in enumerate(methods):
        cancel.check()
        out.append(mlx_lm_model(loaded, cal_tokens, meth, bits=b, group_size=g, **kw))
        progress((i + 1) / len(methods), f"mlx-lm baseline {out[-1][0]} ready")
    return out


# --------------------------------------------------------------------------- sweep
@dataclass
class SweepJob:
    """One row of the sweep. ``kind``: fp | config (``cfg``, calibrated if ``calibrate``) |
    search (``budget_bpw``) | mlx-lm (``method``, ``bits``, ``group_size``). ``cost``: rough
    seconds on the default model on 2 cores, used to balance ranks."""
    name: str
    kind: str
    cfg: object = None
    calibrate: bool = False
    budget_bpw: Optional[float] = None
    method: Optional[str] = None
    bits: int = 2
    group_size: int = 64
    cost: float = 30.0


#: optional configurations (``--extra``): name -> (bits, group, replicas, mode, granularity)
EXTRA_CONFIGS = {
    "k1-g32": (2, 32, 1, "serial", "group"),
    "k2-serial": (2, 64, 2, "serial", "group"),
    "k2-parallel": (2, 64, 2, "parallel", "group"),
    "k2-serial-channel": (2, 64, 2, "serial", "channel"),
}


def default_configs(loaded, *, bits: int = 2, group_size: int = 64, extra=()) -> list:
    """[(name, config, calibrate?)]: RTN 2/3/4-bit, calibrated K=1, and the ``extra`` ones."""
    from dupstudio.core.config import new_config

    shape = _shape(loaded)
    src = loaded.source if loaded.source != "default" else ""
    out = []
    for b in (2, 3, 4):
        out.append((f"RTN {b}-bit g{group_size}", new_config(shape, source=src, bits=b, group_size=group_size), False))
    out.append((f"calibrated K=1 {bits}-bit g{group_size}",
                new_config(shape, source=src, bits=bits, group_size=group_size), True))
    for key in extra:
        if key not in EXTRA_CONFIGS:
            raise DupstudioError(f"unknown extra configuration {key!r} (use {', '.join(EXTRA_CONFIGS)})")
        b, g, k, mode, gran = EXTRA_CONFIGS[key]
        c = new_config(shape, source=src, bits=b, group_size=g, replicas=k, mode=mode)
        for blk in c.blocks:
            for r in blk.replica[1:]:
                r.granularity, r.init = gran, "copy"
        label = {"k1-g32": f"calibrated K=1 {b}-bit g{g}"}.get(key, f"calibrated K={k} {mode}"
                                                                   f"{' channel' if gran == 'channel' else ''} "
                                                                   f"{b}-bit g{g}")
        out.append((label, c, True))
    return out


def sweep_jobs(loaded, *, budgets=(2.5, 3.0), bits: int = 2, group_size: int = 64, extra=(),
               configs: Optional[list] = None, with_search: bool = True, mlx_lm=DEFAULT_MLX_LM) -> list:
    """The sweep's rows as jobs, in the order of the table."""
    jobs = [SweepJob("full precision", "fp", cost=30)]
    for name, cfg, cal in (default_configs(loaded, bits=bits, group_size=group_size, extra=extra)
                           if configs is None else configs):
        reps = max(b.replicas for b in cfg.blocks)
        jobs.append(SweepJob(name, "config", cfg=cfg, calibrate=cal, cost=(550 * reps if cal else 30)))
    if with_search:
        for b in budgets:
            jobs.append(SweepJob(f"search ≤{b:g} bpw", "search", budget_bpw=float(b), bits=bits,
                                 group_size=group_size, cost=1500))
    for meth, b, g in (mlx_lm or ()):
        jobs.append(SweepJob("", "mlx-lm", method=meth, bits=b, group_size=g,
                             cost={"gptq": 120, "awq": 300, "dwq": 1}.get(meth, 35)))
    return jobs


class SweepContext:
    """What every job of one sweep shares: the model, the texts, the settings, a calibration
    cache, the cached full-precision reference of the evaluation windows and of the search's KL
    windows, and the search's move scores."""

    def __init__(self, loaded, cal_tokens, eval_windows, *, settings=None, profile="apple-m1-pro",
                 budget_latency_ms=None, batch_size=4, search_kwargs=None, mlx_lm_kwargs=None,
                 cache_reference: Optional[bool] = None):
        self.loaded, self.cal, self.ev = loaded, np.asarray(cal_tokens), np.asarray(eval_windows)
        self.settings = _fast(settings)
        self.profile, self.budget_latency_ms, self.batch_size = profile, budget_latency_ms, batch_size
        self.search_kwargs = dict(search_kwargs or {})
        self.mlx_lm_kwargs = dict(mlx_lm_kwargs or {})
        self.cache = CalibrationCache()
        self.shape = _shape(loaded)
        self.cache_reference = cache_reference
        self._ref = None
        self._kl_ref = None
        self.scores = {}
        self._evals = {}
        self.eval_hits = 0

    def reference(self, cancel=None):
        """The evaluation reference: cached log-probs when they take < 1/4 of available memory."""
        from dupstudio.core.evaluate import CachedReference

        if self._ref is None:
            want = self.cache_reference
            if want is None:
                from dupstudio.core.streaming import available_memory

                need = CachedReference.estimate_bytes(self.ev, self.shape["vocab_size"])
                want = need < available_memory() / 4
            self._ref = (CachedReference(self.loaded.model, self.ev, batch_size=self.batch_size, cancel=cancel)
                         if want else self.loaded.model)
        return self._ref

    def evaluate(self, model, cancel=None) -> dict:
        from dupstudio.core.evaluate import evaluate

        r = evaluate(model, self.ev, reference=self.reference(cancel), batch_size=self.batch_size, cancel=cancel)
        return {"ppl": r.ppl, "ppl_lo": r.ppl_ci95[0], "ppl_hi": r.ppl_ci95[1], "kl": r.kl,
                "top1": r.top1_agreement}

    def evaluate_config(self, cfg, cancel=None) -> dict:
        """Metrics of a configuration (simulate mode); an identical configuration evaluated
        earlier in this sweep is not evaluated again (e.g. a search that returns its base)."""
        from dupstudio.core.replicate import build

        key = CalibrationCache.key(cfg, self.ev, self.settings)
        if key not in self._evals:
            self._evals[key] = self.evaluate(build(self.loaded, cfg, "simulate"), cancel)
        else:
            self.eval_hits += 1
        return dict(self._evals[key])


def run_job(ctx: SweepContext, job: SweepJob, *, progress=None, cancel=None) -> tuple:
    """(row dict, Config or None) of one sweep job."""
    from dupstudio.core.replicate import accounting, build

    progress, cancel = ensure(progress, cancel)
    t0 = time.perf_counter()
    shape, profile = ctx.shape, ctx.profile
    if job.kind == "fp":
        from dupstudio.core.evaluate import evaluate

        r = evaluate(ctx.loaded.model, ctx.ev, batch_size=ctx.batch_size, cancel=cancel)
        row = {"name": job.name, "source": "fp", "bits_per_weight": 16.0, "embedding_bits": None,
               "ppl": r.ppl, "ppl_lo": r.ppl_ci95[0], "ppl_hi": r.ppl_ci95[1], "kl": 0.0, "top1": 1.0,
               "latency_ms": predicted_latency_ms(None, shape, profile, fp=True), "note": ""}
        cfg = None
    elif job.kind == "config":
        cfg = job.cfg
        if job.calibrate:
            cfg = ctx.cache.calibrate(ctx.loaded, cfg, ctx.cal, ctx.settings, progress=progress, cancel=cancel)
        row = {"name": job.name, "source": "dupstudio", "bits_per_weight": accounting(cfg, shape)["bits_per_weight"],
               "embedding_bits": cfg.embedding.bits, **ctx.evaluate_config(cfg, cancel),
               "latency_ms": predicted_latency_ms(cfg, shape, profile),
               "note": "calibrated (preset settings)" if job.calibrate else ""}
    elif job.kind == "search":
        kw = dict(ctx.search_kwargs)
        kw.setdefault("settings", ctx.settings)
        skey = (job.bits, job.group_size)
        if ctx._kl_ref is None:
            from dupstudio.core.evaluate import CachedReference

            ctx._kl_ref = CachedReference(ctx.loaded.model, _kl_windows(ctx.cal, kw.get("kl_windows", 8)),
                                          cancel=cancel)
        cfg = search(ctx.loaded, ctx.cal, job.budget_bpw, ctx.budget_latency_ms, profile, bits=job.bits,
                     group_size=job.group_size, cache=ctx.cache, scores=ctx.scores.get(skey),
                     reference=ctx._kl_ref, progress=progress, cancel=cancel, **kw)
        sc = cfg.provenance["search"]["scores"]
        if sc:
            ctx.scores.setdefault(skey, [{k: r[k] for k in ("block", "move", "loss_base", "loss", "gain")}
                                         for r in sc])
        chosen = cfg.provenance["search"]["chosen"]
        row = {"name": job.name, "source": "dupstudio", "bits_per_weight": accounting(cfg, shape)["bits_per_weight"],
               "embedding_bits": cfg.embedding.bits, **ctx.evaluate_config(cfg, cancel),
               "latency_ms": predicted_latency_ms(cfg, shape, profile),
               "note": (f"changed blocks: {chosen}" if chosen else "no move fits/helps: the calibrated base")}
    elif job.kind == "mlx-lm":
        name, model, info = mlx_lm_model(ctx.loaded, ctx.cal, job.method, bits=job.bits, group_size=job.group_size,
                                         **ctx.mlx_lm_kwargs)
        if model is not None:
            import mlx.core as mx

            if mx.default_device() == mx.cpu:
                # MLX's CPU quantized matmul runs at ~2 GFLOP/s (an evaluation of 16×512 tokens
                # would take ~20 min): score the same weights dequantized ("fake quant")
                from mlx_lm.utils import dequantize_model

                model = dequantize_model(model)
                mx.eval(model.parameters())
                info["note"] += "; evaluated dequantized (CPU)"
        met = ctx.evaluate(model, cancel) if model is not None else {k: math.nan for k in
                                                                     ("ppl", "ppl_lo", "ppl_hi", "kl", "top1")}
        emb = info["embedding_bits"]
        lat = _predicted_plans_ms(shape, profile, *info["plans"]) if info["plans"] else math.nan
        row = {"name": name, "source": "mlx-lm", "bits_per_weight": info["bits_per_weight"],
               "embedding_bits": emb, **met, "latency_ms": lat, "note": info["note"]}
        cfg = None
        del model
    else:
        raise DupstudioError(f"unknown sweep job kind {job.kind!r}")
    row["seconds"] = time.perf_counter() - t0
    row["within_budget"] = False
    progress(1.0, f"{row['name']}: ppl {row['ppl']:.4g}" if not math.isnan(row["ppl"]) else f"{row['name']}: n/a")
    return row, cfg


def mark_budgets(df, budgets, budget_latency_ms=None):
    """Add ``within_budget`` (the first budget) and one ``within_<b>`` column per budget."""
    budgets = list(budgets)
    for b in budgets:
        ok = df["bits_per_weight"] <= b + 1e-9
        if budget_latency_ms is not None:
            ok = ok & df["latency_ms"].notna() & (df["latency_ms"] <= budget_latency_ms + 1e-9)
        df[f"within_{b:g}"] = ok.astype(bool)
    df["within_budget"] = df[f"within_{budgets[0]:g}"] if budgets else False
    return df


def sweep(loaded, cal_tokens: np.ndarray, eval_windows: np.ndarray, *, budget_bpw=(2.5, 3.0),
          budget_latency_ms: Optional[float] = None, profile: str = "apple-m1-pro", settings=None,
          configs: Optional[list] = None, extra=(), with_search: bool = True,
          search_kwargs: Optional[dict] = None, mlx_lm=True, mlx_lm_kwargs: Optional[dict] = None,
          batch_size: int = 4, jobs: Optional[list] = None, on_config: Optional[Callable] = None,
          progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None):
    """Evaluate configurations, budgeted searches and mlx-lm baselines on the same windows.
    Returns (DataFrame, {name: Config}).

    Columns: name, source (dupstudio/mlx-lm/fp), bits_per_weight, embedding_bits, ppl, ppl_lo,
    ppl_hi, kl, top1, latency_ms (predicted decode, ``profile``), seconds, note, within_budget
    (first budget) and within_<b> per budget. ``budget_bpw``: one number or several (a search
    runs for each). ``jobs``: run only these (see :func:`sweep_jobs`; the distributed sweep
    gives each rank its share)."""
    import pandas as pd

    progress, cancel = ensure(progress, cancel)
    budgets = [float(budget_bpw)] if isinstance(budget_bpw, (int, float)) else [float(b) for b in budget_bpw]
    if jobs is None:
        methods = DEFAULT_MLX_LM if mlx_lm is True else (mlx_lm or ())
        jobs = sweep_jobs(loaded, budgets=budgets, extra=extra, configs=configs, with_search=with_search,
                          mlx_lm=methods)
    ctx = SweepContext(loaded, cal_tokens, eval_windows, settings=settings, profile=profile,
                       budget_latency_ms=budget_latency_ms, batch_size=batch_size,
                       search_kwargs=search_kwargs, mlx_lm_kwargs=mlx_lm_kwargs)
    total = sum(j.cost for j in jobs) or 1.0
    done = 0.0
    rows, cfgs = [], {}
    for job in jobs:
        cancel.check()
        p = _sub_progress(progress, done / total, (done + job.cost) / total, f"{job.name or job.method}: ")
        row, cfg = run_job(ctx, job, progress=p, cancel=cancel)
        if cfg is not None:
            cfgs[row["name"]] = cfg
        rows.append(row)
        if on_config:
            on_config(row)
        done += job.cost
    progress(1.0, f"sweep: {len(rows)} rows")
    df = mark_budgets(pd.DataFrame(rows), budgets, budget_latency_ms)
    df.attrs["calibration_cache_hits"] = ctx.cache.hits
    df.attrs["evaluation_cache_hits"] = ctx.eval_hits
    return df, cfgs


def pareto_front(df, x: str = "bits_per_weight", y: str = "ppl"):
    """Boolean Series: rows not dominated (lower x and lower y are better); NaN rows are False."""
    import pandas as pd

    ok = df[x].notna() & df[y].notna()
    front = pd.Series(False, index=df.index)
    pts = df[ok]
    for i, r in pts.iterrows():
        dominated = ((pts[x] <= r[x]) & (pts[y] <= r[y]) & ((pts[x] < r[x]) | (pts[y] < r[y]))).any()
        front[i] = not dominated
    return front


def best_within_budget(df, cfgs: dict, budget: Optional[float] = None, source: str = "dupstudio"):
    """(name, Config or None) of the lowest-perplexity row of ``source`` within ``budget`` bits per
    weight (default: the first budget's ``within_budget`` column), or (None, None)."""
    col = "within_budget" if budget is None else f"within_{budget:g}"
    if col not in df:
        ok = df["bits_per_weight"] <= budget + 1e-9
    else:
        ok = df[col].astype(bool)
    d = df[(df["source"] == source) & ok & df["ppl"].notna()]
    if source == "dupstudio":
        d = d[d["name"].isin(list(cfgs))]
    if d.empty:
        return None, None
    name = d.sort_values("ppl").iloc[0]["name"]
    return name, cfgs.get(name)
