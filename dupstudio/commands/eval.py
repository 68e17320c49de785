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
    p.add_argument("--stream", dest="stream", action="store_true", default=None,
                   help="evaluate block by block with the model loaded lazily (low memory); "
                        "default: stream only when the in-memory estimate exceeds available RAM")
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="hold the whole model in memory")
    p.add_argument("--dist-timeout", type=float, default=None,
                   help="under mlx.launch: seconds a rank waits for the others before giving up")
    p.set_defaults(func=run)


def _open_lazy(source, quiet=False):
    from dupstudio.commands.info import StderrProgress
    from dupstudio.core.model_io import open_model

    if quiet:
        return open_model(source, lazy=True)
    progress = StderrProgress()
    try:
        return open_model(source, lazy=True, progress=progress)
    finally:
        progress.close()


def run(args) -> int:
    from dupstudio.core import distributed as D

    return D.run_ranked(_run, args)


def _run(args, dist) -> int:
    import mlx.core as mx

    from dupstudio.commands._common import check_context, check_ranges
    from dupstudio.commands.info import StderrProgress
    from dupstudio.core import config as C
    from dupstudio.core.evaluate import evaluate, make_windows, provenance, read_text, tokenize
    from dupstudio.core.jobs import DupstudioError
    from dupstudio.core.model_io import model_shape
    from dupstudio.core.replicate import accounting, build
    from dupstudio.core.streaming import available_memory, estimate_peak_memory, evaluate_streamed
    from dupstudio.core.units import human_bytes

    check_ranges(args, windows=(1, None, "the number of evaluation windows"),
                 ctx=(2, None, "a window needs a token and the one that follows it"),
                 batch=(1, None, "the number of windows evaluated together"),
                 dist_timeout=(1e-3, None, "seconds a rank waits for the others"))
    text = read_text(args.text)
    root = dist.is_root
    cfg = None
    if args.config:
        cpath = Path(args.config)
        if not cpath.is_file():
            raise DupstudioError(f"{cpath}: no such configuration file")
        try:
            raw = json.loads(cpath.read_text(encoding="utf-8"))
            src = (raw.get("model") or {}).get("source") if isinstance(raw, dict) else None
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            src = None
        if args.model is None and src is None:
            C.load(cpath)  # raises the precise error
        source = args.model if args.model is not None else (None if src in ("", "default", None) else src)
        loaded = _open_lazy(source, quiet=not root)
        cfg = C.load(cpath, model_shape(loaded.config))
        bpw = accounting(cfg, model_shape(loaded.config))["bits_per_weight"]
    else:
        loaded = _open_lazy(args.model, quiet=not root)
        bpw = 16.0
    check_context(loaded, args.ctx)
    windows = make_windows(tokenize(loaded.tokenizer, text), args.ctx, args.windows,
                           what=f"text {args.text}")
    want_ref = cfg is not None and not args.no_kl
    est = estimate_peak_memory(loaded.config, cfg, args.windows, args.ctx, batch=args.batch,
                               reference=want_ref)
    avail = available_memory()
    stream = args.stream
    if stream is None:
        stream = est["eval_in_memory_bytes"] > avail
    if root:
        print(f"memory estimate: in memory {human_bytes(est['eval_in_memory_bytes'])}, streamed "
              f"{human_bytes(est['eval_streamed_bytes'])}; available {human_bytes(avail)} -> "
              f"{'streamed' if stream else 'in memory'}", file=sys.stderr)
    if stream and args.mode != "simulate":
        raise DupstudioError("--stream evaluates in simulate mode only (use --no-stream for deploy)")
    progress = StderrProgress() if root else None
    if stream:
        def run_eval(_model, w, reference=None, **kw):
            return evaluate_streamed(loaded, cfg, w, reference=reference is not None,
                                     release=True, **kw)  # nothing uses the weights afterwards
        model, ref = None, (loaded.model if want_ref else None)
    else:
        try:
            mx.eval(loaded.model.parameters())
        except Exception as e:
            raise DupstudioError(f"{loaded.path}: corrupt weight file ({type(e).__name__}: {e})") from e
        run_eval = evaluate
        if cfg is not None:
            model = build(loaded, cfg, args.mode)
            ref = loaded.model if want_ref else None
        else:
            model, ref = loaded.model, None
    if dist.size > 1:
        from dupstudio.core.distributed import evaluate_distributed

        r = evaluate_distributed(model, windows, dist, reference=ref, batch_size=args.batch,
                                 progress=progress, evaluate_fn=run_eval, timeout_s=args.dist_timeout)
    else:
        r = run_eval(model, windows, reference=ref, batch_size=args.batch, progress=progress)
    if progress is not None:
        progress.close()
    if not root:
        return 0
    extra = {"ranks": dist.size} if dist.size > 1 else {}
    r.provenance = provenance(text, args.windows, args.ctx, mode=args.mode, text_path=str(args.text),
                              streamed=bool(stream), **extra)
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
