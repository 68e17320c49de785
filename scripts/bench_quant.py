"""Benchmark: quantize + all metrics for every linear matrix of the default model.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python scripts/bench_quant.py \
        [--bits 2] [--group 64] [--strategy minmax] [--random] [--no-hist] [--repeat 1] \
        [--baseline GITREF] [--json benchmarks/results/quant-stats.json]

Uses the real default model through ``dupstudio.core.model_io`` when it is available, otherwise
random matrices of the default model's shapes (30 blocks × 7 matrices, hidden 576, intermediate
1536, 3 KV heads of 64): 210 matrices, 106 M weights.

``--baseline GITREF`` also times ``metrics.quant_report`` of that commit (its ``dupstudio``
package extracted with ``git archive`` into a temporary folder, run in a child process), one
baseline run after each run of the working tree, so that both see the same machine load.
``--json`` writes the minimum and median of the runs (and of the baseline's) with the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
if __name__ == "__main__" and "--package-root" in sys.argv:  # a baseline child: that dupstudio
    sys.path.insert(0, sys.argv[sys.argv.index("--package-root") + 1])
else:
    sys.path.insert(0, ROOT)

import mlx.core as mx  # noqa: E402

from dupstudio.core import metrics  # noqa: E402

SHAPES = {
    "q_proj": (576, 576),
    "k_proj": (192, 576),
    "v_proj": (192, 576),
    "o_proj": (576, 576),
    "gate_proj": (1536, 576),
    "up_proj": (1536, 576),
    "down_proj": (576, 1536),
}


def random_blocks(n_blocks: int = 30, seed: int = 0):
    mx.random.seed(seed)
    blocks = []
    for _ in range(n_blocks):
        blk = {}
        for name, shape in SHAPES.items():
            w = mx.random.normal(shape) * 0.04
            outl = mx.random.uniform(shape=shape) < 0.002  # a few heavy-tail outliers
            blk[name] = mx.where(outl, w * 6, w).astype(mx.float16)
        mx.eval(blk)
        blocks.append(blk)
    return blocks, "random (default-model shapes, float16)"


def model_blocks(source=None):
    from dupstudio.core.model_io import block_linears, open_model

    lm = open_model(source)
    blocks = block_linears(lm.model)
    mx.eval(blocks)
    return blocks, f"model {os.path.basename(str(getattr(lm, 'path', source)))}"


def load_blocks(args):
    blocks = None
    if not args.random:
        try:
            blocks, what = model_blocks(args.model)
        except Exception as e:  # model_io missing or model unavailable: fall back
            print(f"(real model unavailable: {type(e).__name__}: {e}; using random matrices)",
                  file=sys.stderr)
    if blocks is None:
        blocks, what = random_blocks()
    return blocks, what


def run_once(blocks, args):
    t = time.perf_counter()
    rep = metrics.quant_report(
        blocks, args.bits, args.group, args.strategy, histograms=not args.no_hist
    )
    return time.perf_counter() - t, rep.total


def child_args(args) -> list:
    out = ["--bits", str(args.bits), "--group", str(args.group), "--strategy", args.strategy]
    if args.model:
        out += ["--model", args.model]
    return out + (["--random"] if args.random else []) + (["--no-hist"] if args.no_hist else [])


def baseline_run(root: str, args) -> float:
    """One timed run of the extracted baseline package in a child process."""
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--package-root", root,
                        *child_args(args)], capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise SystemExit(f"baseline run failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])["seconds"]


def summary(times: list) -> dict:
    s = sorted(times)
    mid = len(s) // 2
    median = s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])
    return {"runs": len(s), "min_s": round(s[0], 3), "median_s": round(median, 3),
            "all_s": [round(t, 3) for t in times]}


def machine() -> dict:
    preload = os.environ.get("LD_PRELOAD", "")
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - no load average on this platform
        load = None
    return {"cpus": os.cpu_count(), "system": f"{platform.system()} {platform.machine()}",
            "python": platform.python_version(), "mlx": mx.__version__,
            "backend": str(mx.default_device()), "openblas_preloaded": "openblas" in preload,
            "load_average_at_start": load}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group", default="64")
    p.add_argument("--strategy", default="minmax")
    p.add_argument("--model", default=None, help="model source for open_model()")
    p.add_argument("--random", action="store_true", help="random matrices even if a model exists")
    p.add_argument("--no-hist", action="store_true", help="skip the two histograms per matrix")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--baseline", metavar="GITREF", default=None,
                   help="also time this commit's quant_report, one run after each of ours")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="write min/median of the runs (and the baseline's) and the machine")
    p.add_argument("--package-root", default=None, help=argparse.SUPPRESS)  # baseline child
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    mach = machine()  # (the load average before this process loads anything)
    blocks, what = load_blocks(args)
    if args.package_root:  # a baseline child: one run, one JSON line
        dt, _ = run_once(blocks, args)
        print(json.dumps({"seconds": dt}))
        return 0
    n_mat = sum(len(b) for b in blocks)
    n_w = sum(w.size for b in blocks for w in b.values())
    print(f"{what}: {n_mat} matrices, {n_w / 1e6:.1f} M weights (load {time.perf_counter() - t0:.1f} s)")

    tmp = None
    if args.baseline:
        tmp = tempfile.TemporaryDirectory(prefix="bench-quant-")
        archive = subprocess.run(["git", "-C", ROOT, "archive", args.baseline, "dupstudio"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp.name], input=archive, check=True)
    ours, base = [], []
    try:
        for i in range(args.repeat):
            dt, tot = run_once(blocks, args)
            ours.append(dt)
            line = (f"run {i + 1}: {args.strategy} {args.bits}-bit g{args.group}, metrics"
                    f"{'' if args.no_hist else ' + histograms'}: {dt:.2f} s for {n_mat} matrices "
                    f"({1e3 * dt / n_mat:.1f} ms/matrix); model rel_fro {tot['rel_fro']:.4f}, "
                    f"SQNR {tot['sqnr_db']:.2f} dB, {tot['bits_per_weight']:.3f} bpw")
            if tmp is not None:
                base.append(baseline_run(tmp.name, args))
                line += f"; baseline {args.baseline}: {base[-1]:.2f} s"
            print(line, flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    s = summary(ours)
    print(f"min {s['min_s']:.2f} s, median {s['median_s']:.2f} s over {s['runs']} runs"
          + (f"; baseline min {min(base):.2f} s, median {summary(base)['median_s']:.2f} s"
             if base else ""))
    if args.json:
        result = {
            "benchmark": "quantization statistics of every decoder matrix "
                         "(dupstudio.core.metrics.quant_report: quantize, error, SQNR, clipping"
                         + ("" if args.no_hist else ", weight and error histograms") + ")",
            "command": "scripts/bench_quant.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "model": what, "matrices": n_mat, "weights": n_w,
            "settings": {"bits": args.bits, "strategy": args.strategy,
                         "group_size": int(args.group) if args.group.isdigit() else args.group,
                         "histograms": not args.no_hist},
            "seconds": s,
            "machine": mach,
            "date": time.strftime("%Y-%m-%d"),
        }
        if base:
            result["baseline"] = {"ref": args.baseline, "seconds": summary(base)}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
