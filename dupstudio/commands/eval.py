"""``dupstudio eval [cfg.json] --text FILE --windows 16 --ctx 512 [--json]``: perplexity (with a
bootstrap 95% interval over windows), KL from the full-precision model and top-1 agreement.
Without a configuration, evaluates the full-precision model."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="perplexity / KL / agreement of a configuration",
                              description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?", default=None, help="configuration JSON (omit: full precision)")
    p.add_argument("--model", default=None, help="model (default: the one the configuration names)")
    p.add_argument("--text", required=True, help="UTF-8 evaluation text")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--mode", default="simulate", choices=["simulate", "deploy"],
                   help="simulate: dequantized weights (fast on CPU); deploy: packed kernels")
    p.add_argument("--no-kl", action="store_true", help="skip the full-precision reference pass")
    p.add_argument("--json", action="store_true", help="print the result as JSON (top-level 'ppl')")
    p.add_argument("--save", action="store_true", help="store the result in the configuration's results")
    p.set_defaults(func=run)


def run(args) -> int:
    from dupstudio.commands._common import load_config_and_model, open_model_quiet
    from dupstudio.commands.info import StderrProgress
    from dupstudio.core import config as C
    from dupstudio.core.evaluate import evaluate, make_windows, provenance, read_text, tokenize
    from dupstudio.core.model_io import model_shape
    from dupstudio.core.replicate import accounting, build

    text = read_text(args.text)
    if args.config:
        cfg, loaded = load_config_and_model(args.config, args.model)
        model = build(loaded, cfg, args.mode)
        bpw = accounting(cfg, model_shape(loaded.config))["bits_per_weight"]
        ref = None if args.no_kl else loaded.model
    else:
        cfg, loaded = None, open_model_quiet(args.model)
        model, bpw, ref = loaded.model, 16.0, None
    windows = make_windows(tokenize(loaded.tokenizer, text), args.ctx, args.windows,
                           what=f"text {args.text}")
    progress = StderrProgress()
    r = evaluate(model, windows, reference=ref, batch_size=args.batch, progress=progress)
    progress.close()
    r.provenance = provenance(text, args.windows, args.ctx, mode=args.mode, text_path=str(args.text))
    d = r.to_dict()
    d.pop("window_nll")
    d["bits_per_weight"] = bpw
    d["config"] = args.config
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        lo, hi = r.ppl_ci95
        line = f"ppl {r.ppl:.3f} (95% CI {lo:.3f}-{hi:.3f}) on {r.tokens} tokens ({r.windows}×{r.ctx})"
        if r.kl is not None:
            line += f"; KL {r.kl:.4f} nats/token; top-1 agreement {r.top1_agreement * 100:.2f}%"
        print(line + f"; {bpw:.3f} bits/weight; {r.seconds:.1f}s")
    if args.save and cfg is not None:
        cfg.results.append(d)
        C.save(cfg, Path(args.config))
        print(f"stored in {args.config}", file=sys.stderr)
    return 0
