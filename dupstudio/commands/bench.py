"""``dupstudio bench cfg.json --prompt-tokens 128 --gen-tokens 64 [--profile m1-pro]
[--reference-mlx-lm] [--fp] [--json]``: measure a configuration in deploy mode (prefill and decode
tokens/s, median and spread over repetitions) on this machine, set it against the roofline
prediction from this machine's measured profile (with and without the per-layer floor term), and
print the prediction for the chosen hardware profile."""
from __future__ import annotations

import json
import sys

from dupstudio.core.jobs import DupstudioError


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure decode / prefill speed and compare with the roofline",
                              description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("config", help="configuration JSON")
    p.add_argument("--model", default=None, help="model (default: the one the configuration names)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    p.add_argument("--gen-tokens", type=int, default=64, help="tokens generated (default 64)")
    p.add_argument("--repetitions", "-r", type=int, default=3, help="timed repetitions (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up repetitions (default 1)")
    p.add_argument("--profile", default=None,
                   help="hardware profile to predict for as well (a name from resources/hardware_profiles.json, "
                        "vendor prefix optional, or 'machine'); default: the file's default (Apple M1 Pro)")
    p.add_argument("--reference-mlx-lm", action="store_true",
                   help="also measure mlx-lm's own quantized model of the configuration's bits and group size, "
                        "and dupstudio's K=1 configured as mlx-lm quantizes (embedding included): the wrapper "
                        "overhead ratio")
    p.add_argument("--fp", action="store_true", help="also measure the float model (the compute dtype)")
    p.add_argument("--per-block", action="store_true", help="also time every decoder block of a decode step")
    p.add_argument("--scales", default="float16", choices=["float16", "compute"],
                   help="dtype the deployed scales/biases are held in: float16 as stored (default) or the "
                        "compute dtype (float32 on the CPU: avoids a cast per quantized matmul)")
    p.add_argument("--remeasure", action="store_true", help="measure this machine's profile again first")
    p.add_argument("--no-machine", action="store_true",
                   help="skip this machine's profile (no measured-vs-predicted comparison)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from dupstudio.commands._common import load_config_and_model
    from dupstudio.commands.info import StderrProgress
    from dupstudio.commands.roofline import finite, resolve_profile
    from dupstudio.core import bench as B

    if args.prompt_tokens < 1 or args.gen_tokens < 1:
        raise DupstudioError("--prompt-tokens and --gen-tokens must be at least 1")
    if args.repetitions < 1 or args.warmup < 0:
        raise DupstudioError("--repetitions must be at least 1 and --warmup at least 0")
    profile = resolve_profile(args.profile)  # a bad name fails before any loading
    cfg, loaded = load_config_and_model(args.config, args.model)
    machine = None
    if not args.no_machine:
        from dupstudio.core import machine_profile as MP

        progress = StderrProgress()
        try:
            machine = MP.load_or_measure(refresh=args.remeasure, progress=progress)
        finally:
            progress.close()
    progress = StderrProgress()
    try:
        out = B.bench_config(loaded, cfg, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                             warmup=args.warmup, repetitions=args.repetitions, per_block=args.per_block,
                             reference_mlx_lm=args.reference_mlx_lm, fp=args.fp, label=str(args.config),
                             machine_profile=machine, profile=profile, scale_dtype=args.scales,
                             progress=progress)
    finally:
        progress.close()
    out["config"] = str(args.config)
    if args.json:
        print(json.dumps(finite(out), indent=2, allow_nan=False))
        return 0
    print(format_report(out, machine, profile))
    return 0


def format_report(out: dict, machine, profile) -> str:
    """The bench result as plain-text tables."""
    lines = []
    m = out["machine"]
    load = m.get("loadavg")
    lines.append(f"measured on {m['backend']} ({m['device']}), MLX {m['mlx_version']}, {m.get('cpus')} CPUs"
                 + (f", load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min)" if load else ""))
    lines.append(f"prompt {out['prompt_tokens']} tokens, {out['gen_tokens']} generated (decode at mean context "
                 f"{out['decode_context']}); {out['warmup']} warm-up + {out['repetitions']} repetitions "
                 "(interleaved); median [min-max]")
    lines.append("")
    hdr = f"{'model':44} {'prefill tok/s':>22} {'decode ms/token':>24} {'decode tok/s':>12}"
    lines += [hdr, "-" * len(hdr)]
    for r in out["results"]:
        pre, dec = r["measured"]["prefill"], r["measured"]["decode"]
        pre_tps = [pre["tokens"] * 1e3 / x for x in (pre["median_ms"], pre["max_ms"], pre["min_ms"])]
        lines.append(f"{r['label'][:44]:44} {pre_tps[0]:8.1f} [{pre_tps[1]:.1f}-{pre_tps[2]:.1f}]".ljust(68)
                     + f"{dec['median_ms']:9.2f} [{dec['min_ms']:.2f}-{dec['max_ms']:.2f}]".rjust(24)
                     + f" {dec['tokens_per_s']:12.2f}")
    if machine is not None:
        lines.append("")
        lines.append(f"measured vs predicted on this machine ({machine.label}; profile "
                     f"{machine.meta.get('date', '')}): ratio measured / predicted, ok = within 25%")
        hdr = (f"{'model':44} {'phase':7} {'assumption':10} {'meas ms':>9} {'pred ms':>9} {'no-floor':>9} "
               f"{'per-comp':>9} {'pc no-fl':>9} {'r pred':>7} {'r nofl':>7} {'r pc':>7} {'r pc nf':>7}")
        lines += [hdr, "-" * len(hdr)]
        for r in out["results"]:
            for ph in ("decode", "prefill"):
                c = r["comparison"][ph]
                for a, row in c["assumptions"].items():
                    flag = lambda k: ("" if row[f"ok_{k}"] else "!")  # noqa: E731
                    lines.append(
                        f"{r['label'][:44]:44} {ph:7} {a:10} {c['measured_ms']:9.2f} {row['with_floor']:9.2f} "
                        f"{row['no_floor']:9.2f} {row['per_component']:9.2f} {row['per_component_no_floor']:9.2f} "
                        f"{row['ratio_with_floor']:6.2f}{flag('with_floor'):1} "
                        f"{row['ratio_no_floor']:6.2f}{flag('no_floor'):1} "
                        f"{row['ratio_per_component']:6.2f}{flag('per_component'):1} "
                        f"{row['ratio_per_component_no_floor']:6.2f}{flag('per_component_no_floor'):1}")
        lines.append("pred = max(bandwidth, compute) + passes x floor; per-comp = sum over blocks of max(bandwidth, "
                     "compute) + floor; '!' = outside 25%")
    if profile is not None:
        lines.append("")
        lines.append(f"predicted on {profile.label} ({profile.compute_dtype}), ms (tokens/s):")
        hdr = f"{'model':44} {'phase':7} {'cache':>18} {'dram':>18} {'measured':>18}"
        lines += [hdr, "-" * len(hdr)]
        for r in out["results"]:
            if "profile" not in r:
                continue
            for ph in ("decode", "prefill"):
                cells = []
                for a in ("cache", "dram", "measured"):
                    e = r["profile"][ph][a]
                    cells.append(f"{e['predicted_ms']:8.2f} ({e['tokens_per_s']:7.1f})")
                lines.append(f"{r['label'][:44]:44} {ph:7} " + " ".join(f"{c:>18}" for c in cells))
    wr = out.get("wrapper_ratio")
    if wr:
        lines.append("")
        for key, title in (("default", "float16 scales (default build)"), ("compute", "compute-dtype scales")):
            w = wr.get(key)
            if not w:
                continue
            lines.append(f"wrapper ratio, dupstudio K=1 ({title}) / mlx-lm: decode {w['decode']['median']:.3f} "
                         f"[{w['decode']['min']:.3f}-{w['decode']['max']:.3f}], prefill {w['prefill']['median']:.3f} "
                         f"[{w['prefill']['min']:.3f}-{w['prefill']['max']:.3f}] (1.05 = 5% overhead)")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: dupstudio bench ...")
