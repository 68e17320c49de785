"""``dupstudio export cfg.json --out DIR [--format mlx-lm] [--model MODEL]``: write an mlx-lm model
folder for a configuration (a standard mlx-lm model of the source's architecture when every
block is K = 1 with β = 1, else a custom architecture loaded with ``--trust-remote-code``);
prints its size, bits per weight and path."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a configuration as an mlx-lm model folder",
                              description=__doc__.split(":", 1)[1].strip())
    p.add_argument("config", help="configuration JSON")
    p.add_argument("--out", "-o", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--format", default="mlx-lm", choices=["mlx-lm"], help="output format (mlx-lm)")
    p.add_argument("--model", default=None, help="model (default: the one the configuration names)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="storage type of unquantized tensors: norms, embedding/head when not "
                        "quantized (default float16)")
    p.add_argument("--ppl", type=float, default=None,
                   help="perplexity to state in the README (default: the configuration's last "
                        "stored eval result, if any)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous export in --out (only the files it wrote; never the "
                        "configuration or other files)")
    p.add_argument("--standard", action="store_true",
                   help="refuse configurations that need custom model code (K > 1 or β ≠ 1)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _stored_ppl(cfg):
    for r in reversed(cfg.results or []):
        if isinstance(r, dict) and isinstance(r.get("ppl"), (int, float)):
            return r
    return None


def run(args) -> int:
    from dupstudio.commands._common import load_config_and_model
    from dupstudio.commands.info import StderrProgress
    from dupstudio.core.units import human_bytes
    from dupstudio.core.export import export_model

    cfg, loaded = load_config_and_model(args.config, args.model)
    ppl = args.ppl if args.ppl is not None else _stored_ppl(cfg)
    cpath = Path(args.config)
    inputs = (cpath,) + ((cpath.resolve().parent / cfg.tensors_file,) if cfg.tensors_file else ())
    progress = StderrProgress()
    try:
        r = export_model(loaded, cfg, args.out, progress=progress, ppl=ppl, fmt=args.format,
                         dtype=args.dtype, overwrite=args.overwrite, require_standard=args.standard,
                         inputs=inputs)
    finally:
        progress.close()
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"size {human_bytes(r['bytes'])} ({r['bytes']:,} bytes on disk; weights "
          f"{r['weights_bytes']:,})")
    print(f"bits per weight {r['bits_per_weight']:.4f} (decoder-block linears); "
          f"embedding {r['embedding_bits_per_weight']:.3f}; {r['passes']} passes per token")
    print(f"path {r['path']}")
    if r["trust_remote_code"]:
        print(f"architecture {r['architecture']}: load with --trust-remote-code "
              f"(mlx_lm.load(path, trust_remote_code=True))")
    else:
        print(f"architecture {r['architecture']} (standard mlx-lm; no custom code)")
    if args.dtype != "float32" and _cpu_only():
        print(f"note: MLX's CPU backend runs {args.dtype} activations very slowly; to run this "
              f"export on a CPU, export with --dtype float32", file=sys.stderr)
    return 0


def _cpu_only() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.cpu
