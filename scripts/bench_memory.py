"""Peak resident memory of evaluation and of a short calibration, in memory vs streamed, on a
synthetic llama of a chosen size; every case runs in its own subprocess and is measured with the
operating system's counters (the child's VmHWM from /proc/self/status, else ru_maxrss).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 \
        .venv/bin/python scripts/bench_memory.py --params 1.5e9   # the issue-11 benchmark
    .venv/bin/python scripts/bench_memory.py --params 5e7         # a quick check of the script
    ... scripts/bench_memory.py --params 1.5e9 --cases eval-streamed   # one case (~1 min)

Writes the synthetic model (float16 safetensors, the default model's tokenizer) under
DUPSTUDIO_HOME/synthetic once. The calibration is short (--seqs x --seq-len tokens, --steps Adam
steps, round-to-nearest start: the closed-form start costs ~16 TFLOP per block at hidden 2048)
but walks the whole model. Prints a markdown table with each peak as a share of the model's
float16 size; exit status 1 when a streamed case is not under --limit (default 40%) of it.
Not part of the test suite; a 1.5B run takes ~20 minutes on 2 CPU cores and up to ~12 GB (the
in-memory evaluation: float32 weights plus the dequantized configuration); in-memory cases whose
estimate exceeds the available memory are skipped unless --force."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import contextlib, io, json, resource, sys
from dupstudio.cli import main
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    code = main(sys.argv[1:])
hwm = None
try:
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            hwm = int(line.split()[1]) * 1024
except OSError:
    pass
ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ru = ru if sys.platform == 'darwin' else ru * 1024
out = buf.getvalue().strip()
try:
    result = json.loads(out) if out else None
except ValueError:
    result = out[-500:]
print(json.dumps({"code": code, "vmhwm": hwm, "maxrss": ru, "result": result}))
"""


CASES = ("eval-memory", "eval-streamed", "calibrate-memory", "calibrate-streamed")


def _case_name(what: str, flag: str) -> str:
    return f"{what}-{'streamed' if flag == '--stream' else 'memory'}"


def run_case(argv: list, env: dict) -> dict:
    import resource

    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True,
                       env=env)
    wall = time.perf_counter() - t
    ru_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    ru_children = ru_children if sys.platform == "darwin" else ru_children * 1024
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        raise SystemExit(f"case {' '.join(argv)} failed (status {p.returncode}):\n{p.stderr[-3000:]}")
    d = json.loads(lines[-1])
    if d["code"] != 0:
        raise SystemExit(f"case {' '.join(argv)} exited {d['code']}:\n{p.stderr[-3000:]}")
    d["peak"] = d["vmhwm"] or d["maxrss"]
    d["ru_children_max"] = ru_children
    d["wall_s"] = wall
    d["stderr_memory_line"] = next((ln for ln in p.stderr.splitlines()
                                    if ln.startswith("memory estimate")), "")
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=1.5e9, help="synthetic model size")
    ap.add_argument("--model", default=None, help="an existing model folder instead")
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows")
    ap.add_argument("--ctx", type=int, default=128, help="evaluation window length")
    ap.add_argument("--kl", action="store_true", help="evaluation: also the full-precision reference")
    ap.add_argument("--k2", action="store_true", help="2 replicas on every other block")
    ap.add_argument("--seqs", type=int, default=4, help="calibration sequences")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2, help="Adam steps per block")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--init", default="rtn", choices=["rtn", "closed_form"])
    ap.add_argument("--only", choices=["eval", "calibrate"], default=None)
    ap.add_argument("--cases", default=None, help="comma-separated subset of " + ", ".join(CASES)
                    + " (default: all, or those of --only)")
    ap.add_argument("--limit", type=float, default=0.40, help="streamed peak / float16 size bound")
    ap.add_argument("--force", action="store_true", help="run in-memory cases even when their "
                    "estimate exceeds the available memory")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = ap.parse_args()
    wanted = set(CASES) if args.cases is None else {c.strip() for c in args.cases.split(",") if c.strip()}
    if wanted - set(CASES):
        ap.error(f"--cases: unknown {', '.join(sorted(wanted - set(CASES)))} (choose from "
                 f"{', '.join(CASES)})")
    if args.only:
        wanted = {c for c in wanted if c.startswith(args.only)}

    from dupstudio.core import config as C
    from dupstudio.core.calibrate import settings_from
    from dupstudio.core.model_io import dupstudio_home, model_shape
    from dupstudio.core.streaming import (available_memory, estimate_calibration_memory,
                                          estimate_peak_memory)
    from dupstudio.core.units import human_bytes
    from dupstudio.core.synthetic import write_synthetic_llama
    from dupstudio.core.testing import tiny_text

    if args.model:
        mdir = Path(args.model)
    else:
        mdir = dupstudio_home() / "synthetic" / f"llama-{args.params:.2g}"
        if not (mdir / "config.json").exists():
            t = time.perf_counter()
            write_synthetic_llama(mdir, args.params)
            print(f"wrote {mdir} in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    config = json.loads((mdir / "config.json").read_text())
    shape = model_shape(config)
    n = shape["num_blocks"]
    H, I = shape["hidden_size"], shape["intermediate_size"]
    qd, kvd = shape["num_heads"] * shape["head_dim"], shape["num_kv_heads"] * shape["head_dim"]
    n_params = n * (2 * H * qd + 2 * H * kvd + 3 * H * I + 2 * H) + H + shape["vocab_size"] * H * (
        1 if shape["tied_embeddings"] else 2)
    fp16 = 2 * n_params
    cfg = C.new_config(shape, source=str(mdir), replicas=2 if args.k2 else 1,
                       layers=list(range(0, n, 2)), init="gamma")
    work = dupstudio_home() / "synthetic" / "bench"
    work.mkdir(parents=True, exist_ok=True)
    C.save(cfg, work / "cfg.json")
    need = max(args.windows * args.ctx, args.seqs * args.seq_len)
    (work / "text.txt").write_text(tiny_text(need * 8))
    settings = settings_from("fast", steps=args.steps, seqs=args.seqs, seq_len=args.seq_len,
                             batch=args.batch, init=args.init)
    est_e = estimate_peak_memory(config, cfg, args.windows, args.ctx, batch=args.batch,
                                 reference=args.kl)
    est_c = estimate_calibration_memory(config, cfg, args.seqs, args.seq_len, settings,
                                        checkpoint=True)
    avail = available_memory()
    env = dict(os.environ)
    cases = []
    for flag in ("--no-stream", "--stream"):
        if _case_name("eval", flag) in wanted:
            argv = ["eval", str(work / "cfg.json"), "--text", str(work / "text.txt"), "--windows",
                    str(args.windows), "--ctx", str(args.ctx), "--batch", str(args.batch), "--json",
                    flag] + ([] if args.kl else ["--no-kl"])
            est = est_e["eval_in_memory_bytes" if flag == "--no-stream" else "eval_streamed_bytes"]
            cases.append(("eval", flag, argv, est))
    for flag in ("--no-stream", "--stream"):
        if _case_name("calibrate", flag) in wanted:
            out = work / f"cal{flag.replace('--', '-')}.json"
            argv = ["calibrate", str(work / "cfg.json"), "--text", str(work / "text.txt"),
                    "--seqs", str(args.seqs), "--seq-len", str(args.seq_len), "--steps",
                    str(args.steps), "--batch", str(args.batch), "--init", args.init,
                    "--method", "adam", "--out", str(out), flag]
            est = est_c["in_memory_bytes" if flag == "--no-stream" else "streamed_bytes"]
            cases.append(("calibrate", flag, argv, est, out))
    rows = []
    for case in cases:
        what, flag, argv, est = case[:4]
        path = "streamed" if flag == "--stream" else "in memory"
        if flag == "--no-stream" and est > avail and not args.force:
            rows.append({"run": what, "path": path, "peak": None, "estimate": est,
                         "result": f"skipped: estimate {human_bytes(est)} > available "
                                   f"{human_bytes(avail)}", "wall_s": None})
            continue
        print(f"running {what} {path} ...", file=sys.stderr, flush=True)
        d = run_case(argv, env)
        if what == "eval":
            result = f"ppl {d['result']['ppl']:.4f}"
        else:
            saved = json.loads(case[4].read_text())
            recs = [b.get("calibration") for b in saved["blocks"] if b.get("calibration")]
            result = (f"{len(recs)} blocks, sum loss_after {sum(r['loss_after'] for r in recs):.6g}, "
                      f"tensors {saved['tensors']['sha256'][:12]}")
        rows.append({"run": what, "path": path, "peak": d["peak"], "estimate": est,
                     "result": result, "wall_s": d["wall_s"], "memory_line": d["stderr_memory_line"]})

    print(f"\nmodel {mdir.name}: {n_params / 1e9:.3f}B parameters, {n} blocks, hidden {H}, "
          f"float16 size {human_bytes(fp16)}; eval {args.windows}x{args.ctx} (KL "
          f"{'on' if args.kl else 'off'}), calibration {args.seqs}x{args.seq_len} tokens, "
          f"{args.steps} steps, init {args.init}, K=2 {'on' if args.k2 else 'off'}; "
          f"available {human_bytes(avail)}\n")
    print("| run | path | peak RSS | of float16 size | estimate | result | wall |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    for r in rows:
        share = f"{r['peak'] / fp16:.1%}" if r["peak"] else "-"
        if r["path"] == "streamed" and r["peak"] and r["peak"] >= args.limit * fp16:
            ok = False
        print(f"| {r['run']} | {r['path']} | {human_bytes(r['peak']) if r['peak'] else '-'} | "
              f"{share} | {human_bytes(r['estimate'])} | {r['result']} | "
              f"{'%.0f s' % r['wall_s'] if r['wall_s'] else '-'} |")
    print(f"\nstreamed peaks {'all under' if ok else 'NOT all under'} {args.limit:.0%} of the "
          f"float16 size ({human_bytes(args.limit * fp16)})")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(mdir), "params": n_params,
                                               "fp16_bytes": fp16, "rows": rows}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
