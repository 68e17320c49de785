"""``dupstudio calibrate cfg.json --text FILE --method stats|grid|adam --steps N --out OUT``.

Ctrl-C stops the run without leaving a half-written output; finished blocks are kept in
``OUT.partial/`` and a rerun with the same settings resumes there. ``--stream`` holds one
decoder block's weights at a time (picked by itself when the in-memory estimate does not fit)."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="tune replica parameters on text (block by block)",
                              description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--text", default=None, help="UTF-8 calibration text (default: the shipped excerpt "
                   "of WikiText-2 validation)")
    p.add_argument("--preset", default="fast", choices=["fast", "full"],
                   help="fast: ≤10 min on 2 CPU cores for the default model; full: the reference recipe")
    p.add_argument("--method", default=None, choices=["stats", "grid", "adam"])
    p.add_argument("--steps", type=int, default=None, help="Adam steps per block")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seqs", type=int, default=None, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--init", default=None, choices=["closed_form", "rtn"])
    p.add_argument("--gains", action="store_true", help="also tune per-row and per-column gains")
    p.add_argument("--residual-gain", action="store_true", help="also tune each block's residual gain β")
    p.add_argument("--no-incremental", action="store_true",
                   help="feed blocks the full-precision inputs instead of the quantized model's")
    p.add_argument("--blocks", default=None, help="only these blocks, e.g. 0-3")
    p.add_argument("--model", default=None, help="model (default: the one the configuration names)")
    p.add_argument("--out", "-o", required=True)
    from dupstudio.commands._common import add_stream_flags

    add_stream_flags(p, "calibrate")
    p.set_defaults(func=run)


def run(args) -> int:
    from dupstudio.commands._common import (default_calibration_text, load_config_and_model,
                                            materialize)
    from dupstudio.commands.info import StderrProgress
    from dupstudio.core import config as C
    from dupstudio.core.calibrate import calibrate, settings_from
    from dupstudio.core.evaluate import make_windows, read_text, text_sha256, tokenize

    settings = settings_from(args.preset, method=args.method, steps=args.steps, lr=args.lr,
                             seqs=args.seqs, seq_len=args.seq_len, batch=args.batch, init=args.init,
                             gains=args.gains or None, residual_gain=args.residual_gain or None,
                             incremental=False if args.no_incremental else None)
    from dupstudio.core.streaming import (available_memory, estimate_calibration_memory,
                                          memory_line, pick_stream)

    cfg, loaded = load_config_and_model(args.config, args.model, lazy=True)
    text_path = Path(args.text) if args.text else default_calibration_text()
    text = read_text(text_path)
    toks = make_windows(tokenize(loaded.tokenizer, text), settings.seq_len, settings.seqs,
                        what=f"calibration text {text_path}")
    blocks = C.parse_layers(args.blocks, len(cfg.blocks)) if args.blocks else None
    est = estimate_calibration_memory(loaded.config, cfg, settings.seqs, settings.seq_len, settings,
                                      checkpoint=True)  # finished blocks are read back from OUT.partial
    avail = available_memory()
    stream = pick_stream(est["in_memory_bytes"], avail, args.stream)
    print(memory_line(est["in_memory_bytes"], est["streamed_bytes"], avail, stream), file=sys.stderr)
    if not stream:
        materialize(loaded)
    out = Path(args.out)
    ck = out.parent / (out.name + ".partial")
    progress = StderrProgress()
    t0 = time.perf_counter()
    try:
        new = calibrate(loaded, cfg, toks, settings, progress=progress, checkpoint_dir=ck, blocks=blocks,
                        stream=stream)
    except KeyboardInterrupt:
        progress.close()
        print(f"dupstudio: cancelled; finished blocks kept in {ck} (rerun to resume); "
              f"{out} not written", file=sys.stderr)
        return 130
    progress.close()
    new.provenance["calibration"]["text"] = str(text_path)
    new.provenance["calibration"]["text_sha256"] = text_sha256(text)
    C.save(new, out)
    shutil.rmtree(ck, ignore_errors=True)
    acc = [b.calibration for b in new.blocks if b.calibration]
    better = sum(1 for a in acc if a["accepted"])
    print(f"calibrated {len(acc)} blocks ({better} improved) in {time.perf_counter() - t0:.1f}s; "
          f"wrote {out}", file=sys.stderr)
    return 0
