#!/usr/bin/env python
"""Roofline predictions on a hardware profile (default: Apple M1 Pro, float16 deployment) for the
default model's shapes (SmolLM2-135M) and a 7B model of the same family (Llama-2-7B, by config shapes
alone): float16, 4-bit g64, 2-bit g64 K=1 and 2-bit g64 K=2 serial in every block, under the three
cache assumptions, with and without the per-layer floor.

    python scripts/roofline_demo.py [--profile apple-m1-pro|machine|...] [--context 512]
                                    [--prefill 512] [--embed-bits 16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dupstudio.core.roofline import (  # noqa: E402
    EmbedPlan,
    format_table,
    get_profile,
    predict,
    preset_shape,
    roofline_curve,
    uniform_plan,
)

CONFIGS = [  # label, bits, group, K
    ("fp16", 16, 64, 1),
    ("4-bit g64", 4, 64, 1),
    ("2-bit g64 K=1", 2, 64, 1),
    ("2-bit g64 K=2 serial", 2, 64, 2),
]
MODELS = [("SmolLM2-135M", "smollm2-135m"), ("Llama-2-7B", "llama-2-7b")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=None, help="profile name (default: the file's default, Apple M1 Pro)")
    ap.add_argument("--context", type=int, default=512, help="tokens in the KV cache at the decode step")
    ap.add_argument("--prefill", type=int, default=512, help="prompt length for the prefill estimate")
    ap.add_argument("--embed-bits", type=int, default=16, help="embedding/head bits (16, 8 or 4)")
    ap.add_argument("--json", default=None, help="also write every result and the roofline curve here")
    args = ap.parse_args(argv)

    prof = get_profile(args.profile)
    embed = EmbedPlan(bits=args.embed_bits, group_size=64)
    print(f"profile: {prof.label} [{prof.name}]: {prof.bandwidth_gbs:g} GB/s x "
          f"{prof.achievable_bandwidth_fraction:g} (quantized) / {prof.achievable_bandwidth_fraction_fp16:g} "
          f"(float), {prof.float_tflops:g} TFLOPS {prof.compute_dtype}, quantized {prof.quantized_matmul_tflops:g} "
          f"TFLOPS, {prof.cache_name} {prof.cache_mb:g} MiB, floor {prof.layer_floor_us:g} us/layer pass, "
          f"second-pass r {prof.second_pass_ratio_in_cache:g} (fits) / {prof.second_pass_ratio_spill:g} (spills)")
    print(f"decode at context {args.context}; prefill of {args.prefill} tokens; embedding/head "
          f"{'float16' if args.embed_bits >= 16 else f'{args.embed_bits}-bit g64'}; KV cache float16")
    everything = []
    for model_label, preset in MODELS:
        shape = preset_shape(preset)
        results = []
        for label, bits, group, K in CONFIGS:
            r = predict(shape, uniform_plan(shape, bits, group, K), prof, embed=embed, context=args.context,
                        prefill_tokens=args.prefill, label=label)
            results.append(r)
        everything += results
        print(f"\n=== {model_label} ({shape['num_blocks']} blocks, hidden {shape['hidden_size']}, "
              f"vocab {shape['vocab_size']}, {'tied' if shape['tied_embeddings'] else 'untied'}) ===")
        for r in results:
            b = r.blocks[0]
            print(f"  {r.label:22} {r.bits_per_weight:4.2f} bpw (block linears), one block "
                  f"{b.working_set_bytes / 2**20:7.2f} MiB -> {'fits' if b.fits_in_cache else 'does not fit'} "
                  f"the {prof.cache_mb:g} MiB {prof.cache_name}; deploy size {r.storage_bytes['total'] / 1e6:8.1f} MB")
        print("\n-- decode, per token --")
        print(format_table(results, "decode"))
        print(f"\n-- prefill of {args.prefill} tokens --")
        print(format_table(results, "prefill"))
    if args.json:
        out = {"profile": prof.to_json(), "results": [r.to_dict() for r in everything],
               "curve": roofline_curve(prof, everything)}
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
