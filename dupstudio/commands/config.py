"""``dupstudio config new|show``: create and inspect replication configurations."""
from __future__ import annotations

import json
import sys

from dupstudio.commands.info import HELP_MODEL


def register(subparsers) -> None:
    p = subparsers.add_parser("config", help="create or show a replication configuration (JSON)")
    sub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    n = sub.add_parser("new", help="write a new configuration")
    n.add_argument("model", nargs="?", default=None, help=HELP_MODEL)
    n.add_argument("--bits", type=int, default=2)
    n.add_argument("--group", type=int, default=64, help="group size (must divide the rows)")
    n.add_argument("--strategy", default="minmax", help="scale/zero strategy of the shared codes")
    n.add_argument("--strategy-arg", action="append", default=[], metavar="K=V")
    n.add_argument("--replicas", type=int, default=1, help="K for the chosen layers (1-4)")
    n.add_argument("--mode", default="serial", choices=["serial", "parallel"])
    n.add_argument("--layers", default="all", help="blocks to replicate, e.g. 0-29 or 3,5,7-9")
    n.add_argument("--init", default="copy", help="replica initialisation: copy, lsq, gamma, offset, strategy")
    n.add_argument("--granularity", default="group", choices=["group", "channel"])
    n.add_argument("--embedding-bits", type=int, default=None, help="quantize embedding/head (default: float16)")
    n.add_argument("--out", "-o", required=True, help="output JSON ('-' = stdout)")
    n.set_defaults(func=run_new)
    s = sub.add_parser("show", help="print a configuration with its accounting")
    s.add_argument("config")
    s.add_argument("--model", default=None, help="model to check it against (default: the one it names)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_show)


def parse_kv(items) -> dict:
    from dupstudio.core.jobs import DupstudioError

    out = {}
    for it in items:
        if "=" not in it:
            raise DupstudioError(f"--strategy-arg {it!r}: expected K=V")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def run_new(args) -> int:
    from dupstudio.commands._common import open_model_quiet
    from dupstudio.core import config as C
    from dupstudio.core.model_io import model_shape

    loaded = open_model_quiet(args.model)
    shape = model_shape(loaded.config)
    src = "default" if args.model is None else str(loaded.path if str(args.model).endswith(".gguf") is False
                                                    and not str(args.model).count("/") == 1 else args.model)
    from pathlib import Path

    if args.model is not None and Path(args.model).exists():
        src = str(Path(args.model).resolve())
    cfg = C.new_config(shape, source=src, architecture=loaded.config.get("model_type", "llama"),
                       bits=args.bits, group_size=args.group, strategy=args.strategy,
                       strategy_args=parse_kv(args.strategy_arg), replicas=args.replicas,
                       mode=args.mode, layers=C.parse_layers(args.layers, shape["num_blocks"]),
                       init=args.init, granularity=args.granularity, embedding_bits=args.embedding_bits)
    if args.out == "-":
        sys.stdout.write(C.dumps(cfg) + "\n")
    else:
        C.save(cfg, args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def run_show(args) -> int:
    from dupstudio.commands._common import load_config_and_model
    from dupstudio.core.model_io import model_shape
    from dupstudio.core.replicate import accounting

    cfg, loaded = load_config_and_model(args.config, args.model)
    acc = accounting(cfg, model_shape(loaded.config))
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), "accounting": acc}, indent=2))
        return 0
    d = cfg.defaults
    print(f"model: {cfg.model.source} ({cfg.model.architecture}, {cfg.model.num_blocks} blocks, "
          f"fingerprint {cfg.model.fingerprint})")
    print(f"defaults: {d.bits}-bit, group {d.group_size}, strategy {d.strategy} {d.strategy_args or ''}")
    print(f"embedding: {'float16' if cfg.embedding.bits is None else f'{cfg.embedding.bits}-bit g{cfg.embedding.group_size}'}")
    print(f"{'block':>5} {'K':>2} {'mode':<8} {'gains':<22} {'beta':>5} {'bpw':>6} {'init':<12} calibration")
    for b, row in zip(cfg.blocks, acc["blocks"]):
        gains = ",".join(f"{g:.3g}" for g in b.gains)
        init = ",".join(f"{r.init}/{r.granularity[0]}" for r in b.replica[1:]) or "-"
        cal = ""
        if b.calibration:
            cal = f"{b.calibration['loss_before']:.4g} → {b.calibration['loss_after']:.4g}"
        print(f"{b.index:>5} {b.replicas:>2} {b.mode:<8} {gains:<22} {b.residual_gain:>5.3g} "
              f"{row['bits_per_weight']:>6.3f} {init:<12} {cal}")
    print(f"bits per weight (decoder-block linears): {acc['bits_per_weight']:.4f}; "
          f"block linears {acc['block_linear_bytes'] / 1e6:.2f} MB; embedding/head "
          f"{acc['embedding_bytes'] / 1e6:.2f} MB ({acc['embedding_bits_per_weight']:.2f} bpw); "
          f"decoder passes {acc['passes']}; FLOPs/token ×{acc['flops_ratio']:.3f}")
    return 0
