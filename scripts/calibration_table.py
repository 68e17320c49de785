"""Calibrate and evaluate a set of configurations on the default model (the calibration table in the README).

Usage: python scripts/calibration_table.py --preset fast --out out/cal_fast [--configs k1,k2s,k2p]
Calibration text: ../shared/data/wikitext2-valid.txt; evaluation: wikitext2-test (never calibrated on).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dupstudio.core import config as C
from dupstudio.core.calibrate import calibrate, settings_from
from dupstudio.core.evaluate import evaluate, make_windows, read_text, tokenize
from dupstudio.core.model_io import open_model, model_shape
from dupstudio.core.replicate import accounting, build

ROOT = Path(__file__).resolve().parents[1]
import os
DATA = Path(os.environ.get("DUPSTUDIO_DATA", ROOT.parent / "shared" / "data"))

CONFIGS = {
    "rtn": dict(replicas=1, calibrate=False),
    "k1": dict(replicas=1),
    "k1_gains": dict(replicas=1, gains=True, residual_gain=True),
    "k2s": dict(replicas=2, mode="serial"),
    "k2p": dict(replicas=2, mode="parallel"),
    "k2s_ch": dict(replicas=2, mode="serial", granularity="channel"),
    "k2p_ch": dict(replicas=2, mode="parallel", granularity="channel"),
    "k2s_ch_gains": dict(replicas=2, mode="serial", granularity="channel", gains=True, residual_gain=True),
    "mix_edges": dict(replicas=2, mode="serial", layers=[0, 1, 2, 27, 28, 29]),
    "mix_edges_ch": dict(replicas=2, mode="serial", granularity="channel", layers=list(range(30)),
                         edge_group=[0, 1, 2, 27, 28, 29]),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--method", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seqs", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--init", default=None)
    ap.add_argument("--tag", default="")
    ap.add_argument("--reg", type=float, default=None)
    ap.add_argument("--configs", default="rtn,k1,k2s,k2p")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--out", default="out/cal")
    ap.add_argument("--fp", action="store_true", help="also evaluate full precision")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    L = open_model(None)
    shp = model_shape(L.config)
    cal_text = read_text(DATA / "wikitext2-valid.txt")
    ev_text = read_text(DATA / "wikitext2-test.txt")
    ev = make_windows(tokenize(L.tokenizer, ev_text), 512, a.windows)
    cal_toks = tokenize(L.tokenizer, cal_text)
    rows = []
    if a.fp:
        r = evaluate(L.model, ev)
        r16 = float(np.exp(np.mean(r.window_nll[:16])))
        rows.append({"config": "fp", "bpw": 16.0, "ppl40": r.ppl, "ci95": r.ppl_ci95, "ppl16": r16,
                     "kl": 0.0, "top1": 1.0, "cal_s": 0.0})
        print(rows[-1], flush=True)
    for name in a.configs.split(","):
        spec = dict(CONFIGS[name])
        do_cal = spec.pop("calibrate", True)
        gains = spec.pop("gains", False)
        resid = spec.pop("residual_gain", False)
        edge = spec.pop("edge_group", None)
        cfg = C.new_config(shp, bits=a.bits, group_size=a.group, source="default", **spec)
        for k in edge or []:  # these blocks' second replica gets full per-group parameters
            cfg.blocks[k].replica[1].granularity = "group"
        t0 = time.perf_counter()
        if do_cal:
            s = settings_from(a.preset, method=a.method, steps=a.steps, gains=gains, residual_gain=resid,
                              seqs=a.seqs, seq_len=a.seq_len, batch=a.batch, lr=a.lr, init=a.init, reg=a.reg)
            cal = make_windows(cal_toks, s.seq_len, s.seqs, what="calibration text")
            cfg = calibrate(L, cfg, cal, s, progress=lambda f, m: print(f"  [{name}] {m}", flush=True)
                            if "step" not in m else None,
                            checkpoint_dir=out / f"{name}.partial")
            C.save(cfg, out / f"{name}.json")
        cal_s = time.perf_counter() - t0
        model = build(L, cfg, "simulate")
        r = evaluate(model, ev, reference=L.model)
        r16 = float(np.exp(np.mean(r.window_nll[:16])))
        acc = accounting(cfg, shp)
        rows.append({"config": name + a.tag, "bpw": acc["bits_per_weight"], "ppl40": r.ppl, "ci95": r.ppl_ci95,
                     "ppl16": r16, "kl": r.kl, "top1": r.top1_agreement, "cal_s": cal_s,
                     "gains": [b.gains for b in cfg.blocks][:3]})
        print(rows[-1], flush=True)
        (out / "table.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
