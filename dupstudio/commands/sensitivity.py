"""``dupstudio sensitivity [MODEL] --out DIR``: per decoder block, the KL from full precision on
calibration text when only that block is quantized, and the KL a second, calibrated replica of that
block alone removes. Writes DIR/sensitivity.csv and DIR/sensitivity.png (bars per block) and prints
the table.

All other blocks stay float; calibration uses full-precision inputs and the fast preset unless told
otherwise; KL is measured on the first ``--kl-windows`` calibration windows."""
from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Optional

COLUMNS = ["block", "kl_quantized", "kl_k1", "kl_k2", "kl_gain", "bits_per_weight", "bits_per_weight_k2",
           "seconds"]


def register(subparsers) -> None:
    p = subparsers.add_parser("sensitivity", help="per-block KL when only that block is quantized, and the "
                              "gain of a second replica (CSV + bar chart)", description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=None, help="model (default: the shipped default model)")
    p.add_argument("--text-cal", default=None, help="UTF-8 calibration text (default: the shipped excerpt)")
    p.add_argument("--bits", type=int, default=2, help="bits of the quantized block (default 2)")
    p.add_argument("--group-size", "--group", dest="group_size", type=int, default=64,
                   help="quantization group size (default 64)")
    p.add_argument("--blocks", default=None, help="blocks to measure, e.g. 0,5,10-12 (default: all)")
    p.add_argument("--mode", default="serial", choices=["serial", "parallel"], help="mode of the second replica")
    p.add_argument("--no-replica", action="store_true",
                   help="only the KL with the block quantized (no calibration, much faster)")
    p.add_argument("--kl-windows", type=int, default=8, help="calibration windows the KL is measured on")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--preset", default="fast", choices=["fast", "full"], help="calibration preset")
    p.add_argument("--steps", type=int, default=None, help="Adam steps per block (override the preset)")
    p.add_argument("--seqs", type=int, default=None, help="calibration sequences (override the preset)")
    p.add_argument("--seq-len", type=int, default=None, help="calibration sequence length (override)")
    p.add_argument("--batch", type=int, default=None)
    p.set_defaults(func=run)


def title_of(loaded, bits: int, group_size: int, mode: Optional[str], kl_windows: int) -> str:
    """The chart's title; ``mode`` None: measured without a second replica."""
    name = Path(str(loaded.path)).name if loaded.source not in ("", "default") else "default model"
    return (f"{name}: only block k quantized ({bits}-bit g{group_size})"
            + (f", gain of a second {mode} replica" if mode else "")
            + f"; KL on {kl_windows} calibration window{'s' if kl_windows != 1 else ''}")


def write_plot(df, path: Path, title: str = "") -> Path:
    """Bars per block (KL with only that block quantized; second-replica gain) rendered offscreen
    with pyqtgraph (matplotlib is not a dependency)."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import pyqtgraph as pg

    app = pg.mkQApp()
    from dupstudio.plots import SensitivityPlot

    w = SensitivityPlot()
    try:
        w.set_rows(df.to_dict("records"), title)
        w.export_png(str(path))
    finally:
        # tear the widget down while the QApplication lives (else a crash at interpreter exit)
        w.top.clear()
        w.bottom.clear()
        w.close()
        w.deleteLater()
        del w
        app.processEvents()
        gc.collect()
        app.processEvents()
    return path


def run(args) -> int:
    import pandas as pd

    from dupstudio.commands._common import check_ranges, default_calibration_text, open_model_quiet
    from dupstudio.core.safeio import atomic_write_bytes

    check_ranges(args, kl_windows=(1, None, "windows the KL is measured on"),
                 steps=(1, None, "Adam steps per block"), seqs=(1, None, "calibration sequences"),
                 seq_len=(2, None, "tokens per sequence"), batch=(1, None, "sequences per step"))
    from dupstudio.commands.info import StderrProgress
    from dupstudio.core.calibrate import settings_from
    from dupstudio.core.evaluate import make_windows, read_text, tokenize
    from dupstudio.core.jobs import DupstudioError
    from dupstudio.core.search import base_config
    from dupstudio.core.sensitivity import parse_blocks, sensitivity, top_gain_blocks

    if args.kl_windows < 1:
        raise DupstudioError("--kl-windows must be at least 1")
    if args.blocks is not None:
        parse_blocks(args.blocks, 1 << 30)  # syntax errors before the model loads
    settings = settings_from(args.preset, steps=args.steps, seqs=args.seqs, seq_len=args.seq_len,
                             batch=args.batch)
    loaded = open_model_quiet(args.model)
    blocks = parse_blocks(args.blocks, loaded.num_blocks)
    try:
        cfg = base_config(loaded, args.bits, args.group_size)
        from dupstudio.core.config import validate
        from dupstudio.core.model_io import model_shape

        validate(cfg, model_shape(loaded.config))
    except DupstudioError as e:
        raise DupstudioError(f"--bits {args.bits} --group-size {args.group_size}: {e}") from None
    cal_path = Path(args.text_cal) if args.text_cal else default_calibration_text()
    cal = make_windows(tokenize(loaded.tokenizer, read_text(cal_path)), settings.seq_len, settings.seqs,
                       what=f"calibration text {cal_path}")
    out = Path(args.out)
    progress = StderrProgress()
    try:
        df = sensitivity(loaded, cfg, cal, settings=settings, kl_windows=args.kl_windows,
                         replica_mode=args.mode, with_replica=not args.no_replica, blocks=blocks,
                         progress=progress)
    finally:
        progress.close()
    cols = [c for c in COLUMNS if c in df.columns]
    atomic_write_bytes(out / "sensitivity.csv", df[cols].to_csv(index=False).encode())
    kw = min(args.kl_windows, len(cal))
    title = title_of(loaded, args.bits, args.group_size, None if args.no_replica else args.mode, kw)
    png = write_plot(df, out / "sensitivity.png", title)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(df[cols].to_string(index=False))
    if "kl_gain" in df.columns:
        best = top_gain_blocks(df, 5)
        gains = dict(zip(df["block"], df["kl_gain"]))
        print("largest second-replica gains: " + (", ".join(f"block {b} ({gains[b]:.4g})" for b in best)
                                                  if best else "none (no block's KL went down)"), file=sys.stderr)
    print(f"{len(df)} block(s) in {df.attrs['seconds']:.1f}s; wrote {out / 'sensitivity.csv'}, {png}", file=sys.stderr)
    return 0
