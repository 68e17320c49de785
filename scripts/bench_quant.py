"""Benchmark: quantize + all metrics for every linear matrix of the default model.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python scripts/bench_quant.py \
        [--bits 2] [--group 64] [--strategy minmax] [--random] [--no-hist] [--repeat 1]

Uses the real default model through ``dupstudio.core.model_io`` when it is available, otherwise
random matrices of the default model's shapes (30 blocks × 7 matrices, hidden 576, intermediate
1536, 3 KV heads of 64): 210 matrices, 106 M weights.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

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
    return blocks, f"model {getattr(lm, 'path', source)}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group", default="64")
    p.add_argument("--strategy", default="minmax")
    p.add_argument("--model", default=None, help="model source for open_model()")
    p.add_argument("--random", action="store_true", help="random matrices even if a model exists")
    p.add_argument("--no-hist", action="store_true", help="skip the two histograms per matrix")
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    blocks = None
    if not args.random:
        try:
            blocks, what = model_blocks(args.model)
        except Exception as e:  # model_io missing or model unavailable: fall back
            print(f"(real model unavailable: {type(e).__name__}: {e}; using random matrices)")
    if blocks is None:
        blocks, what = random_blocks()
    n_mat = sum(len(b) for b in blocks)
    n_w = sum(w.size for b in blocks for w in b.values())
    print(f"{what}: {n_mat} matrices, {n_w / 1e6:.1f} M weights (load {time.perf_counter() - t0:.1f} s)")

    for i in range(args.repeat):
        t = time.perf_counter()
        rep = metrics.quant_report(
            blocks, args.bits, args.group, args.strategy, histograms=not args.no_hist
        )
        dt = time.perf_counter() - t
        tot = rep.total
        print(
            f"run {i + 1}: {args.strategy} {args.bits}-bit g{args.group}, metrics"
            f"{'' if args.no_hist else ' + histograms'}: {dt:.2f} s for {n_mat} matrices "
            f"({1e3 * dt / n_mat:.1f} ms/matrix); model rel_fro {tot['rel_fro']:.4f}, "
            f"SQNR {tot['sqnr_db']:.2f} dB, {tot['bits_per_weight']:.3f} bpw"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
