"""``dupstudio sweep [MODEL] --budget-bpw 2.5 --text-cal FILE --text-eval FILE --out DIR``: evaluate RTN
2/3/4-bit, calibrated K=1, K=2 serial/parallel, the budgeted search's result and mlx-lm's own
quantizations on the same windows; writes DIR/sweep.csv, DIR/best.json and PNG plots.

Perplexity (+ bootstrap 95% interval), KL from full precision, top-1 agreement, bits/weight of the
decoder-block linears and the predicted decode latency on a hardware profile (default M1 Pro).
Calibration uses the fast preset by default (minutes per configuration on 2 CPU cores).

Under ``mlx.launch`` with more than one rank the configurations are split across the ranks
(longest first, on each job's cost), every finished row is journaled in the cache
(``<home>/sweeps/...``; a rerun with the same arguments reuses it, ``--fresh`` recomputes) and the
table is gathered on rank 0, which alone writes files; the other ranks print only their progress,
prefixed with their rank. A rank that dies ends the run with ``rank N: ...`` lines naming it and
rank 0 writes the rows it has (missing ones marked) to ``sweep.csv``. See
:func:`dupstudio.core.distributed.sweep_distributed`."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="compare configurations and mlx-lm baselines; budgeted search",
                              description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=None, help="model (default: the shipped default model)")
    p.add_argument("--budget-bpw", type=float, nargs="+", default=[2.5, 3.0],
                   help="bits/weight budget(s) of the block linears; a search runs for each and the best "
                        "row within each is reported (default: 2.5 3.0); best.json is the best within the first")
    p.add_argument("--budget-latency-ms", type=float, default=None,
                   help="predicted decode latency budget (ms/token on --profile)")
    p.add_argument("--profile", default="apple-m1-pro", help="hardware profile for the latency prediction")
    p.add_argument("--text-cal", default=None, help="UTF-8 calibration text (default: the shipped excerpt)")
    p.add_argument("--text-eval", required=True, help="UTF-8 evaluation text")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--windows", type=int, default=16, help="evaluation windows")
    p.add_argument("--ctx", type=int, default=512, help="evaluation window length")
    p.add_argument("--preset", default="fast", choices=["fast", "full"])
    p.add_argument("--steps", type=int, default=None, help="Adam steps per block (override the preset)")
    p.add_argument("--seqs", type=int, default=None, help="calibration sequences (override the preset)")
    p.add_argument("--seq-len", type=int, default=None, help="calibration sequence length (override)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--kl-windows", type=int, default=8, help="calibration windows the search's KL uses")
    p.add_argument("--max-refine", type=int, default=1, help="refinement trials of the search")
    p.add_argument("--moves", default=None,
                   help="comma-separated search moves (default: g32,serial-group,parallel-group,serial-channel; "
                        "also parallel-channel)")
    p.add_argument("--extra", default="",
                   help="comma-separated extra calibrated rows: k1-g32, k2-serial, k2-parallel, k2-serial-channel")
    p.add_argument("--no-search", action="store_true")
    p.add_argument("--no-mlx-lm", action="store_true", help="skip mlx-lm's baselines")
    p.add_argument("--mlx-lm", default=None,
                   help="comma-separated mlx-lm baselines as method:bits:group (methods plain, mixed_2_6, "
                        "mixed_3_6, gptq, awq, dwq); default: plain:2:64,mixed_2_6:2:64,"
                        "mixed_3_6:2:64,gptq:2:64,gptq:2:32,awq:2:64,dwq:2:64")
    p.add_argument("--dist-timeout", type=float, default=None,
                   help="under mlx.launch: seconds a rank waits for the others beyond their predicted "
                        "compute time (default: $DUPSTUDIO_DIST_TIMEOUT or 300)")
    p.add_argument("--fresh", action="store_true",
                   help="under mlx.launch: recompute rows an earlier run with the same arguments journaled")
    p.set_defaults(func=run)


def _is_writer() -> bool:
    try:
        import mlx.core as mx

        if not mx.distributed.is_available():
            return True
        g = mx.distributed.init()
        return g.size() <= 1 or g.rank() == 0
    except Exception:  # noqa: BLE001 - no distribution: this process writes
        return True


def _parse_mlx_lm(text):
    from dupstudio.core.jobs import DupstudioError

    out = []
    for item in [t for t in text.split(",") if t.strip()]:
        parts = item.strip().split(":")
        try:
            meth, bits, group = parts[0], int(parts[1]) if len(parts) > 1 else 2, int(parts[2]) if len(parts) > 2 else 64
        except ValueError:
            raise DupstudioError(f"--mlx-lm: cannot read {item!r} (use method:bits:group, e.g. gptq:2:64)") from None
        out.append((meth, bits, group))
    return tuple(out)


def summary_markdown(df, budgets, *, seconds: float, machine: str = "") -> str:
    """The sweep table as markdown plus the best rows within each budget."""
    import math

    from dupstudio.core.search import best_within_budget, pareto_front

    d = df.copy()
    d["pareto"] = pareto_front(d, "bits_per_weight", "ppl")

    def f(v, fmt="{:.4g}"):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    lines = ["| name | bpw | emb bits | ppl (95% CI) | KL | top-1 | M1 Pro ms/token | Pareto | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for _, r in d.iterrows():
        ppl = f"{f(r['ppl'])} ({f(r['ppl_lo'])}–{f(r['ppl_hi'])})" if not math.isnan(r["ppl"]) else "n/a"
        emb = r["embedding_bits"]
        lines.append(f"| {r['name']} | {f(r['bits_per_weight'], '{:.3f}')} | "
                     f"{'16' if emb is None or (isinstance(emb, float) and math.isnan(emb)) else int(emb)} | {ppl} | "
                     f"{f(r['kl'], '{:.3f}')} | {f(r['top1'] * 100 if r['top1'] == r['top1'] else math.nan, '{:.1f}%')} | "
                     f"{f(r['latency_ms'], '{:.2f}')} | {'●' if r['pareto'] else ''} | {f(r['seconds'], '{:.0f}')} |")
    out = ["\n".join(lines), ""]
    for b in budgets:
        dn, _ = best_within_budget(df, {n: None for n in df["name"]}, b, "dupstudio")
        mn, _ = best_within_budget(df, {}, b, "mlx-lm")
        def desc(n):
            if n is None:
                return "none"
            r = df[df["name"] == n].iloc[0]
            return f"{n} (ppl {r['ppl']:.4g}, {r['bits_per_weight']:.3f} bpw)"
        out.append(f"- best within {b:g} bits/weight: dupstudio: {desc(dn)}; mlx-lm: {desc(mn)}")
    rtn3 = df[df["name"].str.startswith("RTN 3-bit")]
    if not rtn3.empty:
        out.append(f"- RTN 3-bit: ppl {rtn3.iloc[0]['ppl']:.4g} at {rtn3.iloc[0]['bits_per_weight']:.3f} bpw")
    out.append(f"- wall-clock: {seconds:.0f} s{(' on ' + machine) if machine else ''}")
    return "\n".join(out) + "\n"


class _RankProgress:
    """Progress of one rank under mlx.launch: every line prefixed with ``[rank N]``."""

    def __init__(self, rank: int):
        from dupstudio.commands.info import StderrProgress

        self.rank = rank
        self.inner = StderrProgress()

    def __call__(self, fraction, message):
        self.inner(fraction, f"[rank {self.rank}] {message}")

    def close(self):
        self.inner.close()


def run(args) -> int:
    from dupstudio.core import distributed as D

    return D.run_ranked(_run, args)


def _run(args, dist) -> int:
    import math
    import time

    from dupstudio.commands._common import check_ranges, default_calibration_text, open_model_quiet

    check_ranges(args, windows=(1, None, "the number of evaluation windows"),
                 ctx=(2, None, "a window needs a token and the one that follows it"),
                 batch=(1, None, "windows evaluated together"), steps=(1, None, "Adam steps per block"),
                 seqs=(1, None, "calibration sequences"), seq_len=(2, None, "tokens per sequence"),
                 kl_windows=(1, None, "windows the search's KL uses"),
                 max_refine=(0, None, "refinement trials"),
                 dist_timeout=(1e-3, None, "seconds a rank waits for the others"))
    from dupstudio.commands.info import StderrProgress
    from dupstudio.core import config as C
    from dupstudio.core.calibrate import settings_from
    from dupstudio.core.evaluate import make_windows, provenance, read_text, text_sha256, tokenize
    from dupstudio.core.search import DEFAULT_MLX_LM, DEFAULT_MOVES, best_within_budget, sweep

    t_start = time.perf_counter()
    settings = settings_from(args.preset, steps=args.steps, seqs=args.seqs, seq_len=args.seq_len,
                             batch=args.batch)
    budgets = list(args.budget_bpw)
    moves = tuple(m.strip() for m in args.moves.split(",") if m.strip()) if args.moves else DEFAULT_MOVES
    extra = tuple(m.strip() for m in args.extra.split(",") if m.strip())
    methods = () if args.no_mlx_lm else (_parse_mlx_lm(args.mlx_lm) if args.mlx_lm else DEFAULT_MLX_LM)
    if dist.is_root:
        loaded = open_model_quiet(args.model)
    else:  # the other ranks print only their progress
        from dupstudio.core.model_io import open_model

        loaded = open_model(args.model)
    cal_path = Path(args.text_cal) if args.text_cal else default_calibration_text()
    cal_text = read_text(cal_path)
    eval_text = read_text(args.text_eval)
    cal = make_windows(tokenize(loaded.tokenizer, cal_text), settings.seq_len, settings.seqs,
                       what=f"calibration text {cal_path}")
    ev = make_windows(tokenize(loaded.tokenizer, eval_text), args.ctx, args.windows,
                      what=f"evaluation text {args.text_eval}")
    out = Path(args.out)
    search_kwargs = {"kl_windows": args.kl_windows, "max_refine": args.max_refine, "moves": moves}
    if dist.size > 1:
        from dupstudio.core.distributed import sweep_distributed
        from dupstudio.core.search import sweep_jobs

        progress = _RankProgress(dist.rank)
        jobs = sweep_jobs(loaded, budgets=budgets, extra=extra, with_search=not args.no_search, mlx_lm=methods)
        try:
            df, cfgs = sweep_distributed(
                dist, loaded, cal, ev, jobs, budgets=budgets,
                ctx_kwargs={"settings": settings, "profile": args.profile,
                            "budget_latency_ms": args.budget_latency_ms, "search_kwargs": search_kwargs},
                progress=progress, partial_csv=out / "sweep.csv" if dist.is_root else None,
                timeout_s=args.dist_timeout, fresh=args.fresh)
        finally:
            progress.close()
        if not dist.is_root:
            return 0
    else:
        progress = StderrProgress()
        try:
            df, cfgs = sweep(loaded, cal, ev, budget_bpw=budgets, budget_latency_ms=args.budget_latency_ms,
                             profile=args.profile, settings=settings, with_search=not args.no_search,
                             extra=extra, search_kwargs=search_kwargs, mlx_lm=methods, progress=progress)
        finally:
            progress.close()
        if not _is_writer():
            return 0
    seconds = time.perf_counter() - t_start
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance(eval_text, args.windows, args.ctx, text_path=str(args.text_eval),
                      cal_text=str(cal_path), cal_text_sha256=text_sha256(cal_text), preset=args.preset,
                      wall_clock_s=seconds,
                      **({"ranks": dist.size, "reused_rows": df.attrs.get("reused_rows", 0),
                          "journal": df.attrs.get("journal")} if dist.size > 1 else {}))
    C.atomic_write_bytes(out / "sweep.csv", df.to_csv(index=False).encode())
    written = [out / "sweep.csv"]
    bests = {}
    for i, b in enumerate(budgets):
        name, best = best_within_budget(df, cfgs, b)
        bests[b] = name
        if best is None:
            continue
        row = df[df["name"] == name].iloc[0].to_dict()
        best.results = list(best.results) + [{k: (None if isinstance(v, float) and math.isnan(v) else v)
                                              for k, v in row.items()} | {"provenance": prov}]
        best.provenance = dict(best.provenance)
        best.provenance["sweep"] = {"chosen": name, "budget_bpw": b,
                                    "budget_latency_ms": args.budget_latency_ms, **prov}
        fname = "best.json" if i == 0 else f"best_{b:g}.json"
        C.save(best, out / fname)
        written.append(out / fname)
    C.atomic_write_bytes(out / "sweep_provenance.json", (json.dumps(prov, indent=2) + "\n").encode())
    from dupstudio.plots import write_plots

    plots = write_plots(df, out, budgets[0], args.profile, budgets=budgets)
    md = summary_markdown(df, budgets, seconds=seconds, machine=prov.get("machine", ""))
    C.atomic_write_bytes(out / "summary.md", md.encode())
    cols = ["name", "bits_per_weight", "ppl", "ppl_lo", "ppl_hi", "kl", "top1", "latency_ms", "seconds"]
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(df[cols].to_string(index=False))
    for b in budgets:
        print(f"best within {b:g} bits/weight: {bests[b] or 'none'}", file=sys.stderr)
    print(f"sweep took {seconds:.0f} s; wrote " + ", ".join(str(p) for p in written + plots + [out / "summary.md"]),
          file=sys.stderr)
    return 0
