"""``dupstudio quant-report [MODEL] --bits 2 --group 64 --strategy minmax``: quantize every decoder
linear with a scale/zero strategy and report its error per matrix and per block."""
from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

HELP_MODEL = ("model folder (mlx-lm / Hugging Face), .gguf file or hub id; "
              "default: the bundled SmolLM2-135M-Instruct")


def register(subparsers) -> None:
    from dupstudio.core.quant import STRATEGIES

    p = subparsers.add_parser(
        "quant-report",
        help="quantization error of every decoder matrix for a bits/group/strategy setting",
        description=__doc__.split(":", 1)[1].strip(),
    )
    p.add_argument("model", nargs="?", default=None, help=HELP_MODEL)
    p.add_argument("--bits", type=int, default=2, help="2, 3, 4 or 8 (default 2)")
    p.add_argument("--group", default="64",
                   help="group size: 32, 64, 128 (must divide every row) or 'channel' (default 64)")
    p.add_argument("--strategy", default="minmax",
                   help=f"scale/zero strategy: {', '.join(STRATEGIES)} (default minmax)")
    p.add_argument("--strategy-arg", action="append", default=[], metavar="K=V",
                   help="strategy parameter, repeatable (e.g. p=99.9, k=3, trim=0.05, f=0.5, "
                        "error=mse, min_ratio=0.5, steps=20, grid=int, zero_exact=false)")
    p.add_argument("--weight-dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="cast the weights to this dtype before quantizing (errors are still "
                        "measured against the loaded weights)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", metavar="FILE",
                     help="write one tidy CSV (level = matrix / block / total rows); '-' = stdout")
    out.add_argument("--json", metavar="FILE",
                     help='write {"matrices", "blocks", "total", "settings"} as JSON; "-" = stdout')
    p.add_argument("--blocks-only", action="store_true",
                   help="text output: only the per-block summary, not every matrix")
    from dupstudio.commands._common import add_stream_flags

    add_stream_flags(p, "report")
    p.set_defaults(func=run)


def parse_value(text: str) -> Any:
    """``"3"`` → 3, ``"99.9"`` → 99.9, ``"true"`` → True, ``"0.5,0.75,1"`` → list, else str."""
    t = text.strip()
    if "," in t:
        return [parse_value(x) for x in t.split(",") if x.strip()]
    low = t.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def parse_strategy_args(items) -> dict:
    from dupstudio.core.jobs import DupstudioError

    out = {}
    for item in items or []:
        if "=" not in item:
            raise DupstudioError(f"--strategy-arg expects K=V, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        if not k.isidentifier():
            raise DupstudioError(f"--strategy-arg: bad parameter name {k!r}")
        out[k] = parse_value(v)
    return out


def _fmt_table(df) -> str:
    fmts = {
        "bits_per_weight": "{:.3f}".format,
        "mse": "{:.3e}".format,
        "rel_fro": "{:.4f}".format,
        "sqnr_db": "{:.2f}".format,
        "max_abs": "{:.4f}".format,
        "clipped_frac": "{:.4%}".format,
        "out_rel_err": "{:.4f}".format,
        "act_rel_err": "{:.4f}".format,
    }
    return df.to_string(index=False, formatters={k: v for k, v in fmts.items() if k in df})


def tidy_frame(report):
    """Matrices, blocks and the total in one frame with a ``level`` column."""
    import pandas as pd

    from dupstudio.core.metrics import public

    m = report.matrices_frame().assign(level="matrix")
    b = report.blocks_frame().assign(level="block")
    t = pd.DataFrame([{"block": "all", **public(report.total)}]).assign(level="total")
    df = pd.concat([m, b, t], ignore_index=True, sort=False)
    for col in ("params", "bytes", "bits", "group_size", "matrices"):
        if col in df:  # keep integers integral next to the empty cells of other levels
            df[col] = df[col].astype("Int64")
    return df[["level"] + [c for c in df.columns if c != "level"]]


@contextlib.contextmanager
def _open_out(path: str):
    """A writable text stream for ``path``; ``-`` is stdout (left open). A file is written
    atomically when the block ends (the previous file stays intact on any failure)."""
    import io

    from dupstudio.core.safeio import atomic_write_bytes

    if path == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    buf = io.StringIO(newline="")
    yield buf
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def _config_json(loaded) -> dict:
    """The model's config.json (or, for a bare model, its arguments)."""
    import dataclasses

    c = getattr(loaded, "config", None)
    if isinstance(c, dict):
        return c
    a = getattr(getattr(loaded, "model", None), "args", None)
    if a is None:
        return None
    return dataclasses.asdict(a) if dataclasses.is_dataclass(a) else dict(vars(a))


def run(args) -> int:
    import mlx.core as mx

    from dupstudio.core import metrics
    from dupstudio.core import quant as Q
    from dupstudio.core.jobs import DupstudioError

    # Cheap checks before loading the model.
    bits = Q.check_bits(args.bits)
    group = Q.parse_group_size(args.group)
    if args.strategy not in Q.STRATEGIES:
        raise DupstudioError(
            f"unknown strategy {args.strategy!r}; choose from: {', '.join(Q.STRATEGIES)}"
        )
    sargs = parse_strategy_args(args.strategy_arg)
    if args.strategy == "search" and sargs.get("error") == "act":
        raise DupstudioError(
            "search with error=act needs calibration activations (act_sq), which quant-report "
            "does not collect; use error=mse here, or call dupstudio.core.quant.quantize(..., "
            "act_sq=...) with activation statistics"
        )
    metrics.check_settings([], bits, group, args.strategy, sargs)

    from dupstudio.commands._common import materialize
    from dupstudio.core.model_io import block_linears, open_model
    from dupstudio.core.streaming import (StreamedBlocks, available_memory,
                                          estimate_report_memory, memory_line, pick_stream)

    progress = None
    try:
        from dupstudio.commands.info import StderrProgress

        progress = StderrProgress()
    except ImportError:  # pragma: no cover
        pass
    try:
        loaded = open_model(args.model, lazy=True, progress=progress)
        cj = _config_json(loaded)
        est = estimate_report_memory(cj) if cj is not None else None
        avail = available_memory()
        stream = pick_stream(est["in_memory_bytes"], avail, args.stream) if est else bool(args.stream)
        if progress is not None:
            progress.close()
        if est:
            print(memory_line(est["in_memory_bytes"], est["streamed_bytes"], avail, stream),
                  file=sys.stderr)
        if stream:  # one block's weights at a time, read from the files and dropped after use
            blocks = StreamedBlocks(loaded)
        else:
            if getattr(loaded, "model", None) is not None:
                materialize(loaded)
            blocks = block_linears(loaded.model)
        input_dtype = getattr(mx, args.weight_dtype) if args.weight_dtype else None
        report = metrics.quant_report(blocks, bits, group, args.strategy, sargs,
                                      input_dtype=input_dtype, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    report.settings["model"] = str(getattr(loaded, "path", args.model))
    report.settings["streamed"] = bool(stream)
    loaded_dtype = str(next(iter(blocks[0].values())).dtype) if blocks else "?"
    report.settings["weight_dtype"] = args.weight_dtype or loaded_dtype.replace("mlx.core.", "")

    if args.json:
        with _open_out(args.json) as f:
            json.dump(report.to_json_dict(), f, indent=2)
            f.write("\n")
    elif args.csv:
        with _open_out(args.csv) as f:
            tidy_frame(report).to_csv(f, index=False)
    else:
        s = report.settings
        extra = " ".join(f"{k}={v}" for k, v in sargs.items())
        print(f"model      {s['model']}")
        print(f"setting    {bits}-bit, group {group}, strategy {args.strategy} {extra}".rstrip())
        if not args.blocks_only:
            print()
            print(_fmt_table(report.matrices_frame()))
        print()
        print(_fmt_table(report.blocks_frame()))
        t = report.total
        print()
        print(f"total      {t['params']:,} weights, {t['bytes']:,} bytes, "
              f"{t['bits_per_weight']:.3f} bits/weight; rel_fro {t['rel_fro']:.4f}, "
              f"SQNR {t['sqnr_db']:.2f} dB, clipped {t['clipped_frac']:.4%} "
              f"({report.elapsed_s:.1f} s)")
    return 0
