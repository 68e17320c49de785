#!/usr/bin/env python
"""Latency of the default model (SmolLM2-135M) on this machine, measured and predicted.

Measures prefill and decode (dupstudio.core.bench: interleaved repetitions, medians, spread) for

* FP: the float model (float32 on the CPU backend);
* 4-bit g64, 2-bit g64 K=1 and 2-bit g64 K=2 serial everywhere (dupstudio deploy mode, float embedding);
* mlx-lm's own 2-bit g64 model (``nn.quantize`` on mlx-lm's llama, embedding included) and dupstudio's
  K=1 configured exactly like it (like with like), with float16 scales (the default build) and with
  compute-dtype scales: the wrapper-overhead ratio dupstudio / mlx-lm;

and sets every measurement against the roofline prediction on "this machine". The machine profile
(a micro-benchmark: bandwidth, matmul, quantized-matmul throughput per phase, dispatch cost, a llama
block's floor) is re-measured before every timed round, beside the runs it predicts, because the
machine is shared and its load drifts; each round's measurement is divided by that round's
prediction and the ratios' median is reported. Nothing is fitted to the model runs.

Then the Apple M1 Pro predictions (float16 deployment) for the default model and for Llama-2-7B /
Llama-3-8B shapes under each cache assumption. Writes a markdown report to stdout (progress to
stderr); ``--json FILE`` keeps every number.

Usage: LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 .venv/bin/python scripts/bench_latency.py
       [--prompt-tokens 128] [--gen-tokens 64] [--repetitions 3] [--per-block] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WITHIN = 0.25


def log(msg: str) -> None:
    print(f"[bench_latency {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def top_processes(n: int = 4) -> list:
    """The busiest other processes (name and %CPU), to say how loaded the machine was."""
    import subprocess

    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,comm,args", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=5).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for ln in out:
        parts = ln.split(None, 3)
        if len(parts) < 4 or int(parts[0]) == os.getpid():
            continue
        if float(parts[1]) < 5:
            break
        rows.append(f"{parts[2]} {float(parts[1]):.0f}% ({parts[3][:60]})")
        if len(rows) >= n:
            break
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--warmup-tokens", type=int, nargs=2, default=(16, 4), metavar=("PROMPT", "GEN"),
                    help="lengths of the untimed warm-up run of every model (default 16 4)")
    ap.add_argument("--per-block", action="store_true", help="also a per-block decode profile of every model")
    ap.add_argument("--only", default=None,
                    help="comma-separated model keys to measure (default: all): fp, 4bit, 2bit_k1, 2bit_k2, "
                         "dup_as_mlxlm, dup_as_mlxlm_c, mlxlm")
    ap.add_argument("--profile-rounds", default="all", choices=["all", "first"],
                    help="re-measure the machine profile before every round (default) or only the first")
    ap.add_argument("--json", default=None, help="write every number to this JSON file")
    args = ap.parse_args(argv)

    import mlx.core as mx

    from dupstudio.core import bench as B
    from dupstudio.core import machine_profile as MP
    from dupstudio.core import roofline as RF
    from dupstudio.core.model_io import model_shape, open_model

    t_start = time.time()
    load_before, procs_before = loadavg(), top_processes()
    log(f"load average {load_before}; busy: {procs_before}")
    loaded = open_model(None)
    shape = model_shape(loaded.config)
    P, G = args.prompt_tokens, args.gen_tokens

    cfgs = {
        "4bit": B.uniform_config(shape, 4, 64),
        "2bit_k1": B.uniform_config(shape, 2, 64),
        "2bit_k2": B.uniform_config(shape, 2, 64, replicas=2, mode="serial"),
        "dup_as_mlxlm": B.reference_config(shape, 2, 64),
    }
    spec = [  # key, label, kind, config, scale dtype
        ("fp", "FP (float32)", "fp", None, None),
        ("4bit", "4-bit g64 K=1", "dupstudio", cfgs["4bit"], None),
        ("2bit_k1", "2-bit g64 K=1", "dupstudio", cfgs["2bit_k1"], None),
        ("2bit_k2", "2-bit g64 K=2 serial", "dupstudio", cfgs["2bit_k2"], None),
        ("dup_as_mlxlm", "dupstudio 2-bit K=1 as mlx-lm (fp16 scales)", "dupstudio", cfgs["dup_as_mlxlm"], None),
        ("dup_as_mlxlm_c", "dupstudio 2-bit K=1 as mlx-lm (fp32 scales)", "dupstudio", cfgs["dup_as_mlxlm"],
         "compute"),
        ("mlxlm", "mlx-lm 2-bit g64", "mlx-lm", None, None),
    ]
    if args.only:
        keep = set(args.only.split(","))
        spec = [s for s in spec if s[0] in keep]
    models = []
    for key, label, kind, cfg, sd in spec:
        log(f"building {label}")
        if kind == "fp":
            m = B.build_fp(loaded)
        elif kind == "mlx-lm":
            m = B.build_mlx_lm_reference(loaded, 2, 64)
        else:
            m = B.build_deploy(loaded, cfg, scale_dtype=sd)
        models.append((label, kind, m))

    profiles = []

    def before_round(i):
        if profiles and args.profile_rounds == "first":
            profiles.append(profiles[-1])
            return
        log(f"round {i + 1}: measuring the machine profile (load {loadavg()})")
        profiles.append(MP.measure())
        MP.save(profiles[-1])
        p = profiles[-1]
        log(f"  bandwidth {p.bandwidth_gbs:.2f} GB/s, qmm decode {p.quantized_matmul_tflops_by_phase.get('decode')}, "
            f"prefill {p.quantized_matmul_tflops_by_phase.get('prefill')} TFLOPS, floor {p.layer_floor_us:.0f} us")

    results = B.time_models(models, P, G, tokenizer=loaded.tokenizer, vocab_size=shape["vocab_size"], warmup=1,
                            repetitions=args.repetitions, per_block=args.per_block,
                            warmup_tokens=tuple(args.warmup_tokens), before_round=before_round,
                            progress=lambda f, m: log(f"{(f or 0) * 100:3.0f}% {m}"))
    load_after, procs_after = loadavg(), top_processes()
    ctx = B.decode_context(P, G)

    # ---- per round: measured / predicted with that round's profile
    rows = []
    for (key, label, kind, cfg, _), res in zip(spec, results):
        pcfg = cfg if kind == "dupstudio" else (cfgs["dup_as_mlxlm"] if kind == "mlx-lm" else None)
        per = {ph: {k: [] for k in ("with_floor", "no_floor", "per_component", "per_component_no_floor")}
               for ph in B.PHASES}
        preds = {ph: {k: [] for k in per[ph]} for ph in B.PHASES}
        spread_assumptions = []
        for i, prof in enumerate(profiles):
            pred = B.predict_for(shape, prof, pcfg, prompt_tokens=P, gen_tokens=G, fp=kind == "fp", label=label)
            vals = [getattr(pred, "decode")[a].predicted_ms for a in RF.ASSUMPTIONS]
            spread_assumptions.append(max(vals) / min(vals) - 1)
            for ph in B.PHASES:
                meas = getattr(res, ph).seconds[i] * 1e3
                p = B._pred_ms(pred, ph, "measured")
                for k in per[ph]:
                    per[ph][k].append(meas / p[k])
                    preds[ph][k].append(p[k])
        pred_med = {ph: {k: statistics.median(v) for k, v in preds[ph].items()} for ph in preds}
        meas_med = {ph: getattr(res, ph).median_s * 1e3 for ph in B.PHASES}
        row = {"key": key, "label": label, "kind": kind, "measured": res.to_dict(),
               # median measured / median predicted (a round's profile measurement is noisy too)
               "ratio": {ph: {k: meas_med[ph] / v for k, v in pred_med[ph].items()} for ph in pred_med},
               "ratio_rounds": per, "predicted_ms": pred_med,
               "assumption_spread_decode": max(spread_assumptions)}
        rows.append(row)

    by_key = {r["key"]: (r, res) for r, res in zip(rows, results)}
    wrapper = {}
    if "mlxlm" in by_key:
        for k in ("dup_as_mlxlm", "dup_as_mlxlm_c"):
            if k in by_key:
                wrapper[k] = {ph: B.paired_ratio(by_key[k][1], by_key["mlxlm"][1], ph) for ph in B.PHASES}

    # ---- M1 Pro and 7B predictions (float16 deployment)
    m1 = RF.get_profile("apple-m1-pro")
    shapes = {"SmolLM2-135M (default)": shape, "Llama-2-7B": RF.preset_shape("llama-2-7b"),
              "Llama-3-8B": RF.preset_shape("llama-3-8b")}
    variants = [("fp16", 16, 1), ("4-bit g64 K=1", 4, 1), ("2-bit g64 K=1", 2, 1), ("2-bit g64 K=2 serial", 2, 2)]
    m1rows = []
    for sname, shp in shapes.items():
        for vname, bits, K in variants:
            plans = RF.uniform_plan(shp, bits=bits, group_size=64, replicas=K)
            r = RF.predict(shp, plans, m1, embed=RF.EmbedPlan(16), context=ctx, prefill_tokens=P,
                           label=f"{sname} {vname}")
            m1rows.append({"shape": sname, "variant": vname,
                           "decode": {a: r.decode[a].to_dict() for a in RF.ASSUMPTIONS},
                           "prefill": {a: r.prefill[a].to_dict() for a in RF.ASSUMPTIONS}})

    # ---- markdown
    out = []
    w = out.append
    prof0 = profiles[0]
    w("# Latency: measured on this machine vs the roofline\n")
    w(f"Default model SmolLM2-135M-Instruct, {loaded.dtype} on the {MP.backend()} backend "
      f"({MP.device_name() or 'CPU'}, {os.cpu_count()} cores), MLX {mx.__version__}. Prompt {P} tokens, "
      f"{G} generated (decode predicted at the mean context {ctx}). 1 short warm-up "
      f"({args.warmup_tokens[0]}+{args.warmup_tokens[1]} tokens) + {args.repetitions} timed rounds per model, "
      "interleaved; decode per round = median per-token step (mx.eval per token); medians over rounds "
      f"[min-max]. Took {(time.time() - t_start) / 60:.1f} min.\n")
    w(f"Machine load: load average {load_before} before, {load_after} after (1/5/15 min; "
      f"{os.cpu_count()} cores); other busy processes before: {'; '.join(procs_before) or 'none'}; after: "
      f"{'; '.join(procs_after) or 'none'}.\n")
    w(("Machine profile re-measured before every round (micro-benchmarks only): " if args.profile_rounds == "all"
       else "Machine profile measured once, before the first round: ")
      + "; ".join(f"round {i + 1}: bandwidth {p.bandwidth_gbs:.2f} GB/s (float GEMV fraction "
                  f"{p.achievable_bandwidth_fraction_fp16:.2f}), quantized matmul decode "
                  f"{_fmt_q(p, 'decode')}, prefill {_fmt_q(p, 'prefill')} GFLOP/s, float32 "
                  f"{p.fp32_tflops * 1e3:.0f} GFLOP/s (prefill GEMM {p.float_tflops_for('prefill') * 1e3:.0f} "
                  f"GFLOP/s, weight-streaming fraction {p.prefill_float_bandwidth_fraction or 1:.2f}), floor "
                  f"{p.layer_floor_us:.0f} us/pass + {p.layer_row_us:.0f} us per extra row"
                  for i, p in enumerate(profiles if args.profile_rounds == "all" else profiles[:1])) + ".\n")
    w("## Measured\n")
    w("| model | passes | prefill ms | prefill tok/s | decode ms/token | decode tok/s |")
    w("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        m = r["measured"]
        pre, dec = m["prefill"], m["decode"]
        w(f"| {r['label']} | {m['passes']} | {pre['median_ms']:.0f} [{pre['min_ms']:.0f}-{pre['max_ms']:.0f}] | "
          f"{m['prefill_tokens_per_s']:.1f} | {dec['median_ms']:.1f} [{dec['min_ms']:.1f}-{dec['max_ms']:.1f}] | "
          f"{m['decode_tokens_per_s']:.2f} |")
    if wrapper:
        w("\n## Wrapper overhead: dupstudio K=1 configured as mlx-lm quantizes / mlx-lm's own model\n")
        w("Paired per interleaved round; median [min-max]. Under 1.05 = under 5% overhead.\n")
        w("| dupstudio build | decode ratio | prefill ratio |")
        w("|---|---:|---:|")
        names = {"dup_as_mlxlm": "default (scales held as float16, cast by MLX at every call)",
                 "dup_as_mlxlm_c": "scales held in the compute dtype (float32), as mlx-lm's model holds them"}
        for k, v in wrapper.items():
            d, p = v["decode"], v["prefill"]
            w(f"| {names[k]} | {d['median']:.3f} [{d['min']:.3f}-{d['max']:.3f}] | "
              f"{p['median']:.3f} [{p['min']:.3f}-{p['max']:.3f}] |")
    w("\n## Measured vs predicted on this machine\n")
    w("Ratio = median measured / median predicted over the rounds (each round predicted from the profile "
      "measured just before it); in brackets the range of the per-round ratios. `pred` = max(bandwidth, "
      "compute) + passes x floor; `per-comp` = sum over components (each block, the embedding, the head) "
      "of max(bandwidth, compute) + floor: the form that fits a CPU, whose kernels run one after another "
      "(a bandwidth-bound float GEMV head does not overlap compute-bound quantized blocks); `no floor` drops "
      "the floor (and per-row) term. "
      f"**ok** = within ±{WITHIN:.0%}. Cache assumption `measured` (on this machine the three assumptions "
      "differ by at most "
      f"{max(r['assumption_spread_decode'] for r in rows) * 100:.1f}% in predicted decode latency: the "
      f"{prof0.cache_mb:.0f} MiB last-level cache holds every block).\n")
    w("| model | phase | measured ms | pred ms | ratio | pred no floor | ratio | per-comp ms | ratio | "
      "per-comp no floor | ratio |")
    w("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        for ph in ("decode", "prefill"):
            meas = r["measured"][ph]["median_ms"]
            cells = []
            for k in ("with_floor", "no_floor", "per_component", "per_component_no_floor"):
                ratio = r["ratio"][ph][k]
                ok = "**ok**" if abs(ratio - 1) <= WITHIN else "off"
                rr = r["ratio_rounds"][ph][k]
                rng = f" [{min(rr):.2f}-{max(rr):.2f}]" if k == "per_component" and len(rr) > 1 else ""
                cells.append(f"{r['predicted_ms'][ph][k]:.1f} | {ratio:.2f} {ok}{rng}")
            w(f"| {r['label']} | {ph} | {meas:.1f} | " + " | ".join(cells) + " |")
    if args.per_block:
        w("\n## Per-block decode profile (ms, median of steps; mx.eval after every block)\n")
        w("| model | embed | blocks (first 3) | blocks total | head | total |")
        w("|---|---:|---|---:|---:|---:|")
        for r, res in zip(rows, results):
            pb = res.per_block
            w(f"| {r['label']} | {pb['embed_ms']:.2f} | {', '.join(f'{x:.2f}' for x in pb['blocks_ms'][:3])} | "
              f"{pb['blocks_total_ms']:.1f} | {pb['head_ms']:.2f} | {pb['total_ms']:.1f} |")
    w(f"\n## Apple M1 Pro predictions (float16 deployment, float16 embedding/head; decode at context {ctx}, "
      f"prefill of {P} tokens)\n")
    w("ms per decode token (tokens/s); prefill ms. Profile figures are published / estimated, see "
      "resources/hardware_profiles.json.\n")
    w("| model | variant | decode cache | decode dram | decode measured | prefill (any) | decode bound |")
    w("|---|---|---:|---:|---:|---:|---|")
    for r in m1rows:
        d = r["decode"]
        w(f"| {r['shape']} | {r['variant']} | "
          + " | ".join(f"{d[a]['predicted_ms']:.2f} ({d[a]['tokens_per_s']:.0f})" for a in RF.ASSUMPTIONS)
          + f" | {r['prefill']['measured']['predicted_ms']:.0f} | {d['dram']['bound']} |")
    w("\n### K=2 against K=1 and 4-bit on M1 Pro (decode latency ratio; < 1 = faster)\n")
    w("| model | assumption | K=2 / 2-bit K=1 | K=2 / 4-bit K=1 | K=2 / fp16 | K=2 no floor / K=1 no floor |")
    w("|---|---|---:|---:|---:|---:|")
    for sname in shapes:
        get = {r["variant"]: r for r in m1rows if r["shape"] == sname}
        for a in RF.ASSUMPTIONS:
            k2 = get["2-bit g64 K=2 serial"]["decode"][a]
            k1 = get["2-bit g64 K=1"]["decode"][a]
            b4 = get["4-bit g64 K=1"]["decode"][a]
            f16 = get["fp16"]["decode"][a]
            w(f"| {sname} | {a} | {k2['predicted_ms'] / k1['predicted_ms']:.2f} | "
              f"{k2['predicted_ms'] / b4['predicted_ms']:.2f} | {k2['predicted_ms'] / f16['predicted_ms']:.2f} | "
              f"{k2['predicted_no_floor_ms'] / k1['predicted_no_floor_ms']:.2f} |")
    print("\n".join(out))
    if args.json:
        Path(args.json).write_text(json.dumps(_finite({
            "settings": vars(args), "load_before": load_before, "load_after": load_after,
            "procs_before": procs_before, "procs_after": procs_after, "rows": rows, "wrapper": wrapper,
            "profiles": [p.to_json() for p in profiles], "m1_pro": m1rows,
            "per_block": [res.per_block for res in results]}), indent=1))
        log(f"wrote {args.json}")
    return 0


def _fmt_q(p, phase: str) -> str:
    figs = (p.quantized_matmul_tflops_by_phase or {}).get(phase) or p.quantized_matmul_tflops_by_bits
    return "/".join(f"{v * 1e3:.2f}" for _, v in sorted(figs.items())) + " (" + "/".join(
        f"{b}-bit" for b in sorted(figs)) + ")"


def _finite(o):
    import math

    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


if __name__ == "__main__":
    sys.exit(main())
