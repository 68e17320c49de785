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
from dataclasses import asdict, replace
from typing import Callable, Optional

import numpy as np

from dupstudio.core.jobs import CancelToken, DupstudioError, ProgressFn, ensure

MOVES = ("g32", "serial-group", "parallel-group", "serial-channel", "parallel-channel")
LATENCY_ASSUMPTION = "measured"


# --------------------------------------------------------------------------- helpers
def _shape(loaded) -> dict:
    from dupstudio.core.model_io import model_shape

    return model_shape(loaded.config)


def dividing_group_sizes(shape: dict, sizes=(32, 64, 128)) -> list:
    """Group sizes that divide every block matrix's rows (decision 6)."""
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
    head = None if args.tie_word_embeddings else loaded.model.lm_head
    model = DupModel(args, loaded.model.model.embed_tokens, blocks, loaded.model.model.norm, head)
    model.eval()
    mx.eval(model.parameters())
    return model


def calibration_kl(loaded, model, windows: np.ndarray, cancel: Optional[CancelToken] = None) -> float:
    """Mean KL(full precision || model) per token on calibration windows."""
    from dupstudio.core.evaluate import evaluate

    return float(evaluate(model, windows, reference=loaded.model, cancel=cancel).kl)


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


def _predicted_uniform_ms(shape, profile, bits, group_size, embed_bits) -> float:
    from dupstudio.core import roofline as RF
    from dupstudio.core.bench import decode_context

    prof = RF.get_profile(profile) if isinstance(profile, str) else profile
    res = RF.predict(shape, RF.uniform_plan(shape, bits=bits, group_size=group_size), prof,
                     embed=RF.EmbedPlan(bits=embed_bits, group_size=group_size if embed_bits < 16 else 64),
                     context=decode_context(128, 64), prefill_tokens=128, kv_bytes=2)
    return float(res.decode[LATENCY_ASSUMPTION].predicted_ms)


# --------------------------------------------------------------------------- search
def search(loaded, cal_tokens: np.ndarray, budget_bpw: float = 2.5, budget_latency_ms: Optional[float] = None,
           profile: str = "apple-m1-pro", *, bits: int = 2, group_size: int = 64, settings=None,
           score_settings=None, moves=MOVES, kl_windows: int = 8, max_refine: int = 4,
           progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None):
    """Choose per block K (1/2), mode, granularity and group size within the budget.

    1. The base is K=1, ``bits``, ``group_size`` everywhere; it must fit the budget.
    2. Score every move (:data:`MOVES`) on every block at once: one calibration per move with the
       move applied to all blocks, on full-precision inputs (``score_settings``: fast with fewer
       steps/sequences), so each block's loss drop is its own; the base is scored the same way.
    3. Greedy: moves by loss drop per cost (bits/weight added, or predicted ms added when a
       latency budget is given and bits are free), one move per block, while within budget.
    4. Calibrate the chosen configuration (``settings``, incremental) and measure calibration KL.
    5. Refine: up to ``max_refine`` trials that swap a chosen block's move for an alternative
       within budget (or drop it, giving its bits to the best unchosen move), kept if KL drops.
    """
    from dupstudio.core.calibrate import calibrate
    from dupstudio.core.replicate import accounting, build

    progress, cancel = ensure(progress, cancel)
    t_start = time.perf_counter()
    shape = _shape(loaded)
    settings = _fast(settings)
    score_settings = score_settings or replace(settings, steps=max(1, settings.steps // 2),
                                               seqs=min(settings.seqs, 8), incremental=False)
    score_settings = replace(score_settings, incremental=False)
    n = shape["num_blocks"]
    ok_g = dividing_group_sizes(shape)
    moves = [m for m in moves if m != "g32" or (32 in ok_g and group_size == 64)]
    base = base_config(loaded, bits, group_size)
    base_bpw = accounting(base, shape)["bits_per_weight"]
    if base_bpw > budget_bpw + 1e-9:
        raise DupstudioError(f"budget {budget_bpw} bits/weight is below the base configuration's "
                             f"{base_bpw:.3f} ({bits}-bit g{group_size})")
    base_ms = predicted_latency_ms(base, shape, profile)
    if budget_latency_ms is not None and base_ms > budget_latency_ms:
        raise DupstudioError(f"latency budget {budget_latency_ms} ms is below the base configuration's "
                             f"predicted {base_ms:.3f} ms on {profile}")
    toks = np.asarray(cal_tokens)
    stoks = toks[: score_settings.seqs]
    win = _kl_windows(toks, kl_windows)
    history = []
    n_stages = len(moves) + 3
    stage = [0]

    def sp(msg):
        s = stage[0]
        stage[0] += 1
        return _sub_progress(progress, s / n_stages, (s + 1) / n_stages, msg)

    # --- 2. scoring
    def block_losses(c):
        return [b.calibration["loss_after"] if b.calibration else math.nan for b in c.blocks]

    scored = calibrate(loaded, base, stoks, score_settings, progress=sp("score base: "), cancel=cancel)
    base_loss = block_losses(scored)
    table = []
    for mv in moves:
        cancel.check()
        c = base.copy()
        for k in range(n):
            apply_move(c, k, mv)
        c = calibrate(loaded, c, stoks, score_settings, progress=sp(f"score {mv}: "), cancel=cancel)
        ml = block_losses(c)
        for k in range(n):
            d_bpw = block_bpw_delta(base, shape, k, mv)
            one = base.copy()
            apply_move(one, k, mv)
            d_ms = predicted_latency_ms(one, shape, profile) - base_ms
            table.append({"block": k, "move": mv, "loss_base": base_loss[k], "loss": ml[k],
                          "gain": base_loss[k] - ml[k], "bpw_cost": d_bpw, "ms_cost": d_ms})

    def ratio(r):
        cost = r["bpw_cost"] if r["bpw_cost"] > 1e-9 else 0.0
        if budget_latency_ms is not None:
            cost = cost + r["ms_cost"] / max(budget_latency_ms, 1e-9)
        return r["gain"] / max(cost, 1e-6)

    # --- 3. greedy
    def fits(c):
        bpw = accounting(c, shape)["bits_per_weight"]
        if bpw > budget_bpw + 1e-9:
            return False, bpw, None
        ms = predicted_latency_ms(c, shape, profile)
        if budget_latency_ms is not None and ms > budget_latency_ms + 1e-9:
            return False, bpw, ms
        return True, bpw, ms

    chosen = {}
    cur = base.copy()
    for r in sorted([r for r in table if r["gain"] > 0], key=ratio, reverse=True):
        if r["block"] in chosen:
            continue
        c = cur.copy()
        apply_move(c, r["block"], r["move"])
        ok, bpw, ms = fits(c)
        if ok:
            cur, chosen[r["block"]] = c, r["move"]
            history.append({"step": len(history), "phase": "greedy", "block": r["block"], "move": r["move"],
                            "gain": r["gain"], "bpw_cost": r["bpw_cost"], "ms_cost": r["ms_cost"],
                            "bits_per_weight": bpw, "latency_ms": ms})

    # --- 4. calibrate the choice
    cal = calibrate(loaded, cur, toks, settings, progress=sp("calibrate choice: "), cancel=cancel)
    kl = calibration_kl(loaded, build(loaded, cal, "simulate"), win, cancel)
    history.append({"step": len(history), "phase": "calibrate", "kl": kl,
                    "bits_per_weight": accounting(cal, shape)["bits_per_weight"]})

    # --- 5. refinement
    rp = sp("refine: ")
    trials = 0
    if max_refine > 0 and chosen:
        by_block = {}
        for r in table:
            by_block.setdefault(r["block"], []).append(r)
        proposals = []
        for k, mv in sorted(chosen.items(), key=lambda kv: next(r["gain"] for r in by_block[kv[0]]
                                                                  if r["move"] == kv[1])):
            alts = sorted([r for r in by_block[k] if r["move"] != mv and r["gain"] > 0],
                          key=lambda r: r["gain"], reverse=True)
            proposals += [(k, r["move"], None) for r in alts]
            free = sorted([r for r in table if r["block"] not in chosen and r["gain"] > 0],
                          key=ratio, reverse=True)
            proposals += [(k, None, (r["block"], r["move"])) for r in free[:2]]
        for k, mv, other in proposals:
            if trials >= max_refine:
                break
            cancel.check()
            c = cur.copy()
            b = c.blocks[k]
            b.set_replicas(1, "serial")
            b.group_size = None
            if mv is not None:
                apply_move(c, k, mv)
                touched = [k]
            else:
                apply_move(c, other[0], other[1])
                touched = sorted([k, other[0]])
            ok, bpw, ms = fits(c)
            if not ok:
                continue  # only swaps within the budget count as trials
            trials += 1
            rec = {"step": len(history), "phase": "refine", "block": k, "from": chosen.get(k),
                   "to": mv, "moved_to": list(other) if other else None, "bits_per_weight": bpw,
                   "latency_ms": ms, "accepted": False}
            if ok:
                # keep the other blocks' calibrated tensors; recalibrate from the first touched block
                c.tensors = {t: v for t, v in cal.tensors.items()
                             if not any(t.startswith(f"b{j}.") for j in touched)}
                for j, bj in enumerate(c.blocks):
                    if j not in touched:
                        bj.gains, bj.residual_gain = list(cal.blocks[j].gains), cal.blocks[j].residual_gain
                        bj.calibration = cal.blocks[j].calibration
                cc = calibrate(loaded, c, toks, settings, blocks=touched, cancel=cancel)
                kl2 = calibration_kl(loaded, build(loaded, cc, "simulate"), win, cancel)
                rec["kl"] = kl2
                if kl2 < kl:
                    rec["accepted"] = True
                    cur, cal, kl = c, cc, kl2
                    chosen.pop(k, None)
                    if mv is not None:
                        chosen[k] = mv
                    else:
                        chosen[other[0]] = other[1]
            history.append(rec)
            rp(trials / max(1, max_refine), f"trial {trials}: "
               f"{'kept' if rec['accepted'] else 'rejected'}")
    acc = accounting(cal, shape)
    cal.provenance = dict(cal.provenance)
    cal.provenance["search"] = {
        "budget_bpw": budget_bpw, "budget_latency_ms": budget_latency_ms, "profile": profile,
        "bits": bits, "group_size": group_size, "moves": list(moves),
        "settings": asdict(settings), "score_settings": asdict(score_settings),
        "scores": table, "history": history, "chosen": {str(k): v for k, v in sorted(chosen.items())},
        "kl": kl, "kl_windows": int(len(win)), "bits_per_weight": acc["bits_per_weight"],
        "latency_ms": predicted_latency_ms(cal, shape, profile), "seconds": time.perf_counter() - t_start,
    }
    progress(1.0, f"search: {len(chosen)} blocks upgraded, {acc['bits_per_weight']:.3f} bits/weight, "
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


def mlx_lm_baselines(loaded, cal_tokens, *, bits: int = 2, group_size: int = 64,
                     recipes=("mixed_2_6", "mixed_3_6"), methods=("gptq", "awq", "dwq"),
                     progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None):
    """[(name, model or None, info)] of mlx-lm's own quantizations of the loaded float model.

    ``info``: ``embedding_bits``, ``bits_per_weight`` (block linears), ``note``, ``seconds``,
    ``latency_uniform`` (bits, group) when a uniform roofline plan describes it."""
    import mlx.core as mx
    import mlx.nn as nn

    progress, cancel = ensure(progress, cancel)
    out = []

    def done(name, model, emb_bits, note, t0, uniform=None):
        if model is not None:
            mx.eval(model.parameters())
        out.append((name, model, {"embedding_bits": emb_bits, "note": note, "seconds": time.perf_counter() - t0,
                                  "bits_per_weight": mlx_block_bpw(model) if model is not None else math.nan,
                                  "latency_uniform": uniform}))
        progress(None, f"mlx-lm baseline {name} ready")

    # plain conversion (mlx_lm.convert -q): nn.quantize of every Linear and the Embedding
    t0 = time.perf_counter()
    m = _fresh_mlx_lm(loaded)
    nn.quantize(m, group_size=group_size, bits=bits)
    done(f"mlx-lm {bits}-bit g{group_size}", m, bits,
         "mlx_lm.convert-equivalent (nn.quantize; embedding/head quantized too)", t0, (bits, group_size))
    # mixed-precision recipes (mlx_lm.convert --quant-predicate)
    from mlx_lm.convert import mixed_quant_predicate_builder

    for recipe in recipes:
        cancel.check()
        t0 = time.perf_counter()
        m = _fresh_mlx_lm(loaded)
        pred = mixed_quant_predicate_builder(recipe, m, group_size)

        def cls_pred(path, module, pred=pred):
            if not hasattr(module, "to_quantized"):
                return False
            return pred(path, module)

        nn.quantize(m, group_size=group_size, bits=bits, class_predicate=cls_pred)
        emb = getattr(m.model.embed_tokens, "bits", None)
        done(f"mlx-lm {recipe}", m, emb, f"mlx_lm.convert --quant-predicate {recipe} (v_proj/down_proj of "
             "some blocks and lm_head at high bits; latency not predicted: per-matrix bits)", t0)
    calib = mx.array(np.asarray(cal_tokens))
    for meth in methods:
        cancel.check()
        t0 = time.perf_counter()
        if meth == "gptq":
            try:
                from mlx_lm.quant.gptq import gptq_quantize

                m = _fresh_mlx_lm(loaded)
                emb = m.model.embed_tokens
                m, _ = gptq_quantize(m, calib, bits, group_size, 8, group_size, batch_size=4)
                m.model.embed_tokens = emb  # keep the float embedding (the fallback would quantize it)
                done(f"mlx-lm GPTQ {bits}-bit g{group_size}", m, None,
                     "mlx_lm.quant.gptq.gptq_quantize on the local calibration tokens (its CLI's "
                     "load_data downloads a calibration text; the function takes tokens); embedding float",
                     t0, (bits, group_size))
            except Exception as e:  # noqa: BLE001
                done(f"mlx-lm GPTQ {bits}-bit g{group_size}", None, None, f"failed: {e}", t0)
        elif meth == "awq":
            try:
                from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize

                mt = loaded.config.get("model_type", "llama")
                if mt not in AWQ_MODEL_CONFIGS:
                    raise DupstudioError(f"AWQ has no configuration for model type {mt}")
                m = _fresh_mlx_lm(loaded)
                emb = m.model.embed_tokens
                awq_quantize(m, calib, AWQ_MODEL_CONFIGS[mt], group_size=group_size, bits=bits,
                             embed_group_size=group_size, embed_bits=8, n_grid=10)
                m.model.embed_tokens = emb
                done(f"mlx-lm AWQ {bits}-bit g{group_size}", m, None,
                     "mlx_lm.quant.awq.awq_quantize on the local calibration tokens (n_grid 10; its CLI's "
                     "load_data downloads a calibration text; the function takes tokens); embedding float",
                     t0, (bits, group_size))
            except Exception as e:  # noqa: BLE001
                done(f"mlx-lm AWQ {bits}-bit g{group_size}", None, None, f"failed: {e}", t0)
        elif meth == "dwq":
            done(f"mlx-lm DWQ {bits}-bit g{group_size}", None, None,
                 "not run offline: mlx_lm.quant.dwq.load_data takes a Hugging Face dataset name "
                 "(tuner.datasets.load_dataset with hf_dataset) and fetches it from the hub; its "
                 "dwq_quantize is whole-model logit distillation from a quantized start, not wired to "
                 "local text here", t0)
    return out


# --------------------------------------------------------------------------- sweep
def default_configs(loaded, *, bits: int = 2, group_size: int = 64) -> list:
    """[(name, config, calibrate?)] of the standard sweep."""
    from dupstudio.core.config import new_config

    shape = _shape(loaded)
    src = loaded.source if loaded.source != "default" else ""
    out = []
    for b in (2, 3, 4):
        out.append((f"RTN {b}-bit g{group_size}", new_config(shape, source=src, bits=b, group_size=group_size), False))
    out.append((f"calibrated K=1 {bits}-bit g{group_size}", new_config(shape, source=src, bits=bits,
                                                                       group_size=group_size), True))
    for mode in ("serial", "parallel"):
        out.append((f"calibrated K=2 {mode} {bits}-bit g{group_size}",
                    new_config(shape, source=src, bits=bits, group_size=group_size, replicas=2, mode=mode), True))
    return out


def sweep(loaded, cal_tokens: np.ndarray, eval_windows: np.ndarray, *, budget_bpw: float = 2.5,
          budget_latency_ms: Optional[float] = None, profile: str = "apple-m1-pro", settings=None,
          configs: Optional[list] = None, with_search: bool = True, search_kwargs: Optional[dict] = None,
          mlx_lm: bool = True, mlx_lm_kwargs: Optional[dict] = None, batch_size: int = 4,
          on_config: Optional[Callable] = None, progress: Optional[ProgressFn] = None,
          cancel: Optional[CancelToken] = None):
    """Evaluate configurations and baselines. Returns (DataFrame, {name: Config}).

    Columns: name, source (dupstudio/mlx-lm/fp), bits_per_weight, embedding_bits, ppl, ppl_lo,
    ppl_hi, kl, top1, latency_ms (predicted decode, ``profile``), within_budget, seconds, note."""
    import pandas as pd

    from dupstudio.core.calibrate import calibrate
    from dupstudio.core.evaluate import evaluate
    from dupstudio.core.replicate import accounting, build

    progress, cancel = ensure(progress, cancel)
    shape = _shape(loaded)
    settings = _fast(settings)
    configs = default_configs(loaded) if configs is None else configs
    rows, cfgs = [], {}
    total = len(configs) + (1 if with_search else 0) + (1 if mlx_lm else 0) + 1
    step = [0]

    def sub(msg):
        s = step[0]
        step[0] += 1
        return _sub_progress(progress, s / total, (s + 1) / total, msg)

    def ev(model, name):
        r = evaluate(model, eval_windows, reference=loaded.model, batch_size=batch_size, cancel=cancel)
        return {"ppl": r.ppl, "ppl_lo": r.ppl_ci95[0], "ppl_hi": r.ppl_ci95[1], "kl": r.kl,
                "top1": r.top1_agreement}

    def add(row):
        row["within_budget"] = bool(row["bits_per_weight"] <= budget_bpw + 1e-9 and
                                    (budget_latency_ms is None or
                                     (not math.isnan(row.get("latency_ms", math.nan)) and
                                      row["latency_ms"] <= budget_latency_ms)))
        rows.append(row)
        if on_config:
            on_config(row)

    # full precision
    t0 = time.perf_counter()
    r = evaluate(loaded.model, eval_windows, batch_size=batch_size, cancel=cancel)
    add({"name": "full precision", "source": "fp", "bits_per_weight": 16.0, "embedding_bits": None,
         "ppl": r.ppl, "ppl_lo": r.ppl_ci95[0], "ppl_hi": r.ppl_ci95[1], "kl": 0.0, "top1": 1.0,
         "latency_ms": predicted_latency_ms(None, shape, profile, fp=True), "seconds": time.perf_counter() - t0,
         "note": ""})
    sub("fp")(1.0, "full precision evaluated")
    for name, cfg, do_cal in configs:
        cancel.check()
        t0 = time.perf_counter()
        p = sub(f"{name}: ")
        if do_cal:
            cfg = calibrate(loaded, cfg, cal_tokens, settings, progress=p, cancel=cancel)
        cfgs[name] = cfg
        row = {"name": name, "source": "dupstudio", "bits_per_weight": accounting(cfg, shape)["bits_per_weight"],
               "embedding_bits": cfg.embedding.bits, **ev(build(loaded, cfg, "simulate"), name),
               "latency_ms": predicted_latency_ms(cfg, shape, profile),
               "seconds": time.perf_counter() - t0, "note": "calibrated (preset settings)" if do_cal else ""}
        add(row)
        p(1.0, f"{name}: ppl {row['ppl']:.4g}")
    if with_search:
        cancel.check()
        t0 = time.perf_counter()
        p = sub("search: ")
        kw = dict(search_kwargs or {})
        kw.setdefault("settings", settings)
        cfg = search(loaded, cal_tokens, budget_bpw, budget_latency_ms, profile, progress=p, cancel=cancel, **kw)
        name = f"search ≤{budget_bpw:g} bpw"
        cfgs[name] = cfg
        add({"name": name, "source": "dupstudio", "bits_per_weight": accounting(cfg, shape)["bits_per_weight"],
             "embedding_bits": cfg.embedding.bits, **ev(build(loaded, cfg, "simulate"), name),
             "latency_ms": predicted_latency_ms(cfg, shape, profile), "seconds": time.perf_counter() - t0,
             "note": f"blocks upgraded: {cfg.provenance['search']['chosen']}"})
    if mlx_lm:
        p = sub("mlx-lm: ")
        for name, model, info in mlx_lm_baselines(loaded, cal_tokens, progress=p, cancel=cancel,
                                                  **(mlx_lm_kwargs or {})):
            cancel.check()
            t0 = time.perf_counter()
            met = ev(model, name) if model is not None else {k: math.nan for k in
                                                             ("ppl", "ppl_lo", "ppl_hi", "kl", "top1")}
            u = info["latency_uniform"]
            emb = info["embedding_bits"]
            lat = (_predicted_uniform_ms(shape, profile, u[0], u[1], emb if emb else 16)
                   if u and model is not None else math.nan)
            add({"name": name, "source": "mlx-lm", "bits_per_weight": info["bits_per_weight"],
                 "embedding_bits": emb, **met, "latency_ms": lat,
                 "seconds": info["seconds"] + time.perf_counter() - t0, "note": info["note"]})
    progress(1.0, f"sweep: {len(rows)} rows")
    df = pd.DataFrame(rows)
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


def best_within_budget(df, cfgs: dict):
    """(name, Config) of the lowest-perplexity dupstudio configuration within the budget, or (None, None)."""
    d = df[(df["source"] == "dupstudio") & df["within_budget"] & df["ppl"].notna()]
    d = d[d["name"].isin(list(cfgs))]
    if d.empty:
        return None, None
    name = d.sort_values("ppl").iloc[0]["name"]
    return name, cfgs[name]
