"""Peak memory (RSS high-water mark) of ``dupstudio eval`` in memory vs streamed on a synthetic
llama of a chosen size, one subprocess per case.

    python scripts/bench_memory.py --params 0.2e9 --windows 4 --ctx 128 [--kl] [--k2]

Writes the synthetic model under DUPSTUDIO_HOME/synthetic once. Do not run the 1.5B case on a
shared machine that is busy (it takes minutes and several GB)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, io, contextlib
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
print(json.dumps({"code": code, "vmhwm": hwm, "maxrss": ru, "result": json.loads(buf.getvalue() or 'null')}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=0.2e9)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--kl", action="store_true", help="also the full-precision reference pass")
    ap.add_argument("--k2", action="store_true", help="2 replicas on every other block")
    ap.add_argument("--model", default=None, help="an existing model folder instead")
    args = ap.parse_args()

    from dupstudio.core import config as C
    from dupstudio.core.model_io import dupstudio_home, model_shape
    from dupstudio.core.streaming import estimate_peak_memory, human_bytes
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
    cfg = C.new_config(shape, source=str(mdir), replicas=2 if args.k2 else 1,
                       layers=list(range(0, n, 2)), init="gamma")
    work = dupstudio_home() / "synthetic" / "bench"
    work.mkdir(parents=True, exist_ok=True)
    C.save(cfg, work / "cfg.json")
    (work / "text.txt").write_text(tiny_text(args.windows * args.ctx * 8))
    est = estimate_peak_memory(config, cfg, args.windows, args.ctx, reference=args.kl)
    rows = []
    for flag in ("--no-stream", "--stream"):
        argv = ["eval", str(work / "cfg.json"), "--text", str(work / "text.txt"), "--windows",
                str(args.windows), "--ctx", str(args.ctx), "--json", flag]
        if not args.kl:
            argv.append("--no-kl")
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True,
                           env=os.environ)
        wall = time.perf_counter() - t
        if p.returncode != 0:
            print(p.stderr, file=sys.stderr)
            return 1
        d = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append({"case": flag.strip("-"), "peak_rss": d["vmhwm"] or d["maxrss"],
                     "ppl": d["result"]["ppl"], "wall_s": wall})
    print(f"model {mdir.name}: {shape['num_blocks']} blocks, hidden {shape['hidden_size']}, "
          f"{args.windows}x{args.ctx} windows, KL {'on' if args.kl else 'off'}, "
          f"K=2 {'on' if args.k2 else 'off'}")
    print(f"estimate: in memory {human_bytes(est['eval_in_memory_bytes'])}, streamed "
          f"{human_bytes(est['eval_streamed_bytes'])}")
    for r in rows:
        print(f"{r['case']:>10}: peak RSS {human_bytes(r['peak_rss'])}, ppl {r['ppl']:.4f}, "
              f"{r['wall_s']:.1f}s")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
