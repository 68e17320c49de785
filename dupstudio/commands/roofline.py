"""``dupstudio roofline [cfg.json] [--profile m1-pro] [--context N] [--json]``: the roofline model of a
configuration (bytes, FLOPs, passes and predicted latency per decode token and per prefill under
the three cache assumptions), without running the model. ``--shape llama-2-7b`` with ``--bits``,
``--group``, ``--replicas`` and ``--mode`` predicts for a model shape alone (no model, no
configuration)."""
from __future__ import annotations

import json
import sys

from dupstudio.core.jobs import DupstudioError

BITS_CHOICES = (2, 3, 4, 5, 6, 8, 16, 32)


def register(subparsers) -> None:
    from dupstudio.core.roofline import SHAPE_PRESETS

    p = subparsers.add_parser(
        "roofline", help="predicted latency of a configuration (roofline model; runs nothing)",
        description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("config", nargs="?", default=None, help="configuration JSON (or use --shape)")
    p.add_argument("--model", default=None,
                   help="model whose shape the configuration is for (default: the one it names); only its "
                        "config.json is read")
    p.add_argument("--shape", default=None, choices=sorted(SHAPE_PRESETS),
                   help="predict for this model shape alone (no configuration, no weights)")
    p.add_argument("--bits", type=int, default=2, choices=BITS_CHOICES,
                   help="with --shape: bits of every decoder block (16 / 32: float; default 2)")
    p.add_argument("--group", type=int, default=64, help="with --shape: group size (default 64)")
    p.add_argument("--replicas", "-K", type=int, default=1, help="with --shape: K passes per block (default 1)")
    p.add_argument("--mode", default="serial", choices=["serial", "parallel"], help="with --shape: replica mode")
    p.add_argument("--embedding-bits", type=int, default=None, choices=BITS_CHOICES,
                   help="with --shape: bits of the embedding / head (default: float of the profile's dtype)")
    p.add_argument("--profile", default=None,
                   help="hardware profile: a name from resources/hardware_profiles.json (the vendor prefix "
                        "may be left out: m1-pro) or 'machine' (this machine, measured once and cached); "
                        "default: the file's default (Apple M1 Pro)")
    p.add_argument("--context", type=int, default=512, help="tokens already in the KV cache at the decode step "
                                                            "(default 512)")
    p.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the prefill (default 512)")
    p.add_argument("--list-profiles", action="store_true", help="list the hardware profiles and exit")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def resolve_profile(name):
    """A HardwareProfile for ``--profile`` (``machine``: the cached measured profile, measured now
    when absent or stale)."""
    from dupstudio.core import roofline as RF

    if name is not None and str(name).strip().lower().replace(" ", "-") in RF.MACHINE_PROFILE_NAMES:
        from dupstudio.commands.info import StderrProgress
        from dupstudio.core import machine_profile as MP

        progress = StderrProgress()
        try:
            return MP.load_or_measure(progress=progress)
        finally:
            progress.close()
    return RF.get_profile(name)


def shape_of_model(source) -> dict:
    """The model shape from the model's config.json alone (no weights are loaded)."""
    from dupstudio.commands.info import StderrProgress
    from dupstudio.core.model_io import check_model_dir, model_shape, resolve_model_dir

    progress = StderrProgress()
    try:
        path = resolve_model_dir(source, progress=progress)
    finally:
        progress.close()
    return model_shape(check_model_dir(path))


def load_config_shape(path, model_override=None):
    """(config, shape): the configuration checked against its model's shape."""
    from pathlib import Path

    from dupstudio.core import config as C

    p = Path(path)
    if not p.is_file():
        raise DupstudioError(f"{p}: no such configuration file")
    raw = C.load(p)  # precise errors for a malformed file, before touching any model
    src = model_override if model_override is not None else (
        None if raw.model.source in ("", "default", None) else raw.model.source)
    shape = shape_of_model(src)
    return C.load(p, shape), shape


def compute(args):
    """(RooflineResult, profile, description) for the parsed arguments."""
    from dupstudio.core import roofline as RF
    from dupstudio.core.bench import float_bits_of

    if args.context < 0 or args.prefill_tokens < 0:
        raise DupstudioError("--context and --prefill-tokens must be >= 0")
    prof = resolve_profile(args.profile)
    fb = float_bits_of(prof)
    if args.shape:
        if args.config:
            raise DupstudioError("give a configuration or --shape, not both")
        shape = RF.preset_shape(args.shape)
        if args.replicas < 1:
            raise DupstudioError("--replicas must be at least 1")
        plans = RF.uniform_plan(shape, bits=args.bits, group_size=args.group, replicas=args.replicas,
                                mode=args.mode)
        embed = RF.EmbedPlan(bits=args.embedding_bits or fb, group_size=args.group)
        what = (f"{args.shape}: {'float' if args.bits >= 16 else f'{args.bits}-bit g{args.group}'} "
                f"K={args.replicas} {args.mode}")
    elif args.config:
        cfg, shape = load_config_shape(args.config, args.model)
        plans, embed = RF.plans_from_config(cfg, shape, float_bits=fb)
        what = str(args.config)
    else:
        raise DupstudioError("give a configuration file, or --shape PRESET (e.g. --shape llama-2-7b --bits 2)")
    res = RF.predict(shape, plans, prof, embed=embed, context=args.context, prefill_tokens=args.prefill_tokens,
                     kv_bytes=fb // 8, label=what)
    return res, prof, what


def run(args) -> int:
    from dupstudio.core import roofline as RF

    if args.list_profiles:
        doc = RF.load_profiles_doc()
        for name, d in doc["profiles"].items():
            print(f"{name:18} {d.get('label', name)}{'  (default)' if name == doc['default'] else ''}")
        print(f"{'machine':18} this machine (measured by a micro-benchmark, cached)")
        return 0
    res, prof, what = compute(args)
    if args.json:
        d = res.to_dict()
        d["profile_label"] = prof.label
        d["compute_dtype"] = prof.compute_dtype
        d["source"] = what
        d["units"] = {"*_ms": "milliseconds per decode token (decode) or per prefill of prefill_tokens",
                      "bytes": "bytes from DRAM", "flops": "FLOPs"}
        print(json.dumps(finite(d), indent=2, allow_nan=False))
        return 0
    sh = res.shape
    print(f"{what} on {prof.label} ({prof.compute_dtype}); decode at context {res.context}, "
          f"prefill of {res.prefill_tokens} tokens")
    print(f"shape: hidden {sh['hidden_size']}, intermediate {sh['intermediate_size']}, {sh['num_blocks']} blocks, "
          f"{sh['num_heads']}/{sh['num_kv_heads']} heads x {sh['head_dim']}, vocab {sh['vocab_size']}"
          f"{', tied' if sh['tied_embeddings'] else ''}")
    print(f"block linears: {res.bits_per_weight:.3f} bits/weight; deploy size "
          f"{res.storage_bytes['total'] / 1e6:.1f} MB; {res.passes['decode']} layer passes per token")
    print("\ndecode, per token:")
    print(RF.format_table([res], "decode"))
    if res.prefill_tokens:
        print(f"\nprefill, {res.prefill_tokens} tokens:")
        print(RF.format_table([res], "prefill"))
    print("\nbw ms: bytes / achievable bandwidth; comp ms: FLOPs / peak of the path that runs; floor ms: passes x "
          "per-layer floor; pred = max(bw, comp) + floor; per-comp = sum over blocks of max(bw, comp) + floor")
    for n in res.notes:
        print(f"note: {n}")
    estimates = [f for f in RF.PROFILE_FIGURES if prof.is_estimate(f)]
    if estimates:
        print(f"profile figures that are estimates: {', '.join(estimates)}", file=sys.stderr)
    return 0


def finite(o):
    """Strict JSON: NaN and infinities become null."""
    import math

    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite(v) for v in o]
    return o
