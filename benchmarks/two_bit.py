"""The 2-bit table: calibration pipelines on the default model, one JSON row per configuration.

    python benchmarks/two_bit.py --rows rtn,adam,gptq,gptq_adam,gptq_adam+e2e --out FILE.json

Every row is evaluated on the first ``--windows`` 512-token windows of WikiText-2 *test* (with a
bootstrap 95% interval, KL and top-1 agreement against full precision) and on a text of another
kind (``benchmarks/data/python-stdlib.txt``, Python source), because code-changing methods can fit
the calibration text's domain. Calibration text: WikiText-2 *validation* (never the test file).
A row named ``A+e2e`` starts from row ``A``'s configuration and adds the end-to-end stage.
Rows are appended to ``--out`` as they finish (a stopped run keeps what it measured), and each
configuration is saved beside it so a later run can continue from it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dupstudio import __version__  # noqa: E402
from dupstudio.core import config as C  # noqa: E402
from dupstudio.core.calibrate import calibrate, settings_from  # noqa: E402
from dupstudio.core.jobs import CancelToken  # noqa: E402
from dupstudio.core.evaluate import evaluate, make_windows, read_text, text_sha256, tokenize  # noqa: E402
from dupstudio.core.model_io import model_shape, open_model  # noqa: E402
from dupstudio.core.replicate import accounting, build  # noqa: E402

DATA = Path(os.environ.get("DUPSTUDIO_DATA", ROOT.parent / "shared" / "data"))
OTHER = ROOT / "benchmarks" / "data" / "python-stdlib.txt"

#: rows: config (bits, group, K, mode), calibration settings over the chosen preset; None = no
#: calibration. Stages are named in the row.
ROWS = {
    "rtn": dict(cal=None),
    "adam": dict(cal=dict()),
    "gptq": dict(cal=dict(codes="gptq", steps=0, init="rtn")),
    "gptq_lsq": dict(cal=dict(codes="gptq", steps=0)),
    "gptq_adam": dict(cal=dict(codes="gptq")),
    "gptq_adam_ao": dict(cal=dict(codes="gptq", gptq_act_order=True)),
    "gptq_adam_gains": dict(cal=dict(codes="gptq", gains=True)),
    "adam_gains": dict(cal=dict(gains=True)),
    "gptq_adam_3b": dict(bits=3, cal=dict(codes="gptq")),
    "gptq_adam_g32": dict(group=32, cal=dict(codes="gptq")),
    "gptq_adam_k2s": dict(K=2, mode="serial", cal=dict(codes="gptq")),
    "gptq_adam_k2p": dict(K=2, mode="parallel", cal=dict(codes="gptq")),
    "ap": dict(cal=dict(method="ap")),
    "gptq_ap": dict(cal=dict(method="ap", codes="gptq")),
    "ap_gains": dict(cal=dict(method="ap", gains=True)),
    "ap_3b": dict(bits=3, cal=dict(method="ap")),
    "ap_g32": dict(group=32, cal=dict(method="ap")),
    "ap_k2s": dict(K=2, mode="serial", cal=dict(method="ap")),
    "ap_k2p": dict(K=2, mode="parallel", cal=dict(method="ap")),
}


def stages(row: str, s) -> str:
    if s is None:
        return "round-to-nearest"
    out = ["GPTQ codes" + (" (act-order)" if s.gptq_act_order else "") if s.codes == "gptq"
           else "round-to-nearest codes"]
    if s.init == "closed_form":
        out.append("closed-form scales")
    if s.steps:
        out.append(f"block-wise Adam {s.steps} steps" + (" + row/col gains" if s.gains else "")
                   + (f" with learned rounding (latent step {s.ap_lr:g})" if s.method == "ap" else ""))
    return " → ".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="rtn,adam,gptq,gptq_adam,gptq_adam+e2e")
    ap.add_argument("--preset", default="full")
    ap.add_argument("--cal-seqs", type=int, default=None, help="calibration sequences (default: the preset's)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--ap-lr", type=float, default=None, help="learned rounding's latent step (default: the preset's)")
    ap.add_argument("--e2e-steps", type=int, default=1000)
    ap.add_argument("--e2e-lr", type=float, default=1e-3)
    ap.add_argument("--e2e-seconds", type=float, default=None,
                    help="stop the end-to-end stage after this long (keeping its best held-out step)")
    ap.add_argument("--e2e-seqs", type=int, default=None, help="sequences for the end-to-end stage (default: all of the file)")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--device", default="", help="a note on the machine (e.g. 'H100 (accelerator)')")
    ap.add_argument("--fp", action="store_true", help="also a full-precision row")
    ap.add_argument("--model", default=None, help="model (default: the default model)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", default="", help="rows (comma-separated) to export and ask the fixed prompts "
                    "through mlx-lm alone, as soon as each is measured")
    a = ap.parse_args()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg_dir = out.with_suffix("")
    cfg_dir.mkdir(exist_ok=True)
    rows = json.loads(out.read_text()) if out.exists() else []

    L = open_model(a.model)
    shp = model_shape(L.config)
    cal_path = DATA / "wikitext2-valid.txt"
    cal_toks = tokenize(L.tokenizer, read_text(cal_path))
    ev_text = read_text(DATA / "wikitext2-test.txt")
    other_text = read_text(OTHER)
    ev = make_windows(tokenize(L.tokenizer, ev_text), 512, a.windows)
    other = make_windows(tokenize(L.tokenizer, other_text), 512, a.windows)
    import mlx.core as mx

    base = {"eval_file": "wikitext2-test.txt", "eval_sha256": text_sha256(ev_text), "windows": a.windows,
            "ctx": 512, "other_file": OTHER.name, "other_sha256": text_sha256(other_text),
            "device": a.device or str(mx.default_device()), "backend": str(mx.default_device()),
            "cpu_cores": os.cpu_count(), "machine": f"{platform.node()} {platform.machine()}",
            "dupstudio_version": __version__, "mlx_version": mx.__version__}

    def measure(name, cfg, method, st, cal_tokens, seconds, extra=None):
        model = build(L, cfg, "simulate")
        r = evaluate(model, ev, reference=L.model)
        r2 = evaluate(model, other)
        acc = accounting(cfg, shp) if cfg is not None else None
        row = {"row": name, "method": method, "stages": st,
               "bits": cfg.defaults.bits, "group": cfg.defaults.group_size,
               "K": max(b.replicas for b in cfg.blocks), "bpw": acc["bits_per_weight"],
               "embedding": "float16 (not quantized), beside the block figure",
               "cal_file": cal_path.name if cal_tokens else None, "cal_tokens": int(cal_tokens),
               "ppl": r.ppl, "ppl_ci95": list(r.ppl_ci95), "ppl_16w": float(np.exp(np.mean(r.window_nll[:16]))),
               "kl": r.kl, "top1": r.top1_agreement, "other_ppl": r2.ppl, "other_ci95": list(r2.ppl_ci95),
               "wall_s": seconds, **base, **(extra or {})}
        rows.append(row)
        out.write_text(json.dumps(rows, indent=1))
        print(json.dumps({k: row[k] for k in ("row", "bpw", "ppl", "ppl_ci95", "kl", "top1", "other_ppl",
                                               "wall_s")}), flush=True)
        return model

    if a.fp:
        t0 = time.perf_counter()
        r = evaluate(L.model, ev)
        r2 = evaluate(L.model, other)
        rows.append({"row": "fp", "method": "full precision", "stages": "", "bits": 16, "bpw": 16.0,
                     "K": 1, "ppl": r.ppl, "ppl_ci95": list(r.ppl_ci95), "kl": 0.0, "top1": 1.0,
                     "other_ppl": r2.ppl, "other_ci95": list(r2.ppl_ci95), "cal_tokens": 0,
                     "wall_s": time.perf_counter() - t0, **base})
        out.write_text(json.dumps(rows, indent=1))
        print(rows[-1]["row"], r.ppl, r2.ppl, flush=True)

    def log(name):
        last = [0.0]

        def p(f, m):
            now = time.perf_counter()
            if now - last[0] > 20 or ("block" in m or "end-to-end" in m) and "step" not in m:
                last[0] = now
                print(f"  [{name}] {m}", flush=True)
        return p

    done = {}
    for name in a.rows.split(","):
        t0 = time.perf_counter()
        if name.endswith("+e2e"):
            src = name[:-4]
            cfg = done.get(src) or C.load(cfg_dir / f"{src}.json")
            seqs = a.e2e_seqs or len(cal_toks) // 512
            cal = make_windows(cal_toks, 512, seqs, what="calibration text")
            s = settings_from(a.preset, method="e2e", e2e_steps=a.e2e_steps, e2e_lr=a.e2e_lr, batch=8)
            tok = CancelToken()
            if a.e2e_seconds:
                threading.Timer(a.e2e_seconds, tok.cancel).start()
            cfg = calibrate(L, cfg, cal, s, progress=log(name), cancel=tok)
            tok.cancel()
            e = cfg.provenance["calibration"]["end_to_end"]
            prev = next((r for r in rows if r["row"] == src), {})
            st = (prev.get("stages", src) + f" → end-to-end KL {e['steps']} steps of 8×512 (lr {a.e2e_lr}, best "
                  f"step {e['best_step']}, held-out KL {e['kl_before']:.4f} → {e['kl_after']:.4f})")
            measure(name, cfg, "e2e", st, cal.size + prev.get("cal_tokens", 0),
                    time.perf_counter() - t0 + prev.get("wall_s", 0.0),
                    {"e2e_tokens": int(cal.size), "e2e_seconds": e["seconds"]})
        else:
            spec = ROWS[name]
            cfg = C.new_config(shp, bits=spec.get("bits", 2), group_size=spec.get("group", 64),
                               replicas=spec.get("K", 1), mode=spec.get("mode", "serial"), source="default")
            s = None
            ntok = 0
            if spec["cal"] is not None:
                over = dict(spec["cal"])
                if a.steps is not None and over.get("steps", 1):
                    over["steps"] = a.steps
                if over.get("method") == "ap" and a.ap_lr:
                    over["ap_lr"] = a.ap_lr
                s = settings_from(a.preset, seqs=a.cal_seqs, **over)
                cal = make_windows(cal_toks, s.seq_len, s.seqs, what="calibration text")
                ntok = cal.size
                cfg = calibrate(L, cfg, cal, s, progress=log(name))
            measure(name, cfg, "calibrate" if s else "rtn", stages(name, s), ntok, time.perf_counter() - t0)
        done[name] = cfg
        C.save(cfg, cfg_dir / f"{name}.json")
        if name in a.prompts.split(","):
            ask(L, cfg, cfg_dir, name, rows, out)


def ask(L, cfg, cfg_dir, name, rows, out):
    """Export the row's configuration as an mlx-lm model and keep its answers to the prompts."""
    from dupstudio.core.export import export_model

    dest = cfg_dir / f"{name}-mlx"
    t0 = time.perf_counter()
    export_model(L, cfg, dest, overwrite=True)
    gen = prompts(dest)
    (cfg_dir / f"{name}-prompts.json").write_text(json.dumps(gen, indent=1))
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    for r in rows:
        if r["row"] == name:
            r["export_bytes"] = size
            r["prompts"] = [{"prompt": p, "answer": t} for p, t in gen]
    out.write_text(json.dumps(rows, indent=1))
    for p, t in gen:
        print(f"PROMPT {p!r}\n  -> {t!r}", flush=True)
    print(f"  [{name}] exported {size / 1e6:.1f} MB and answered in {time.perf_counter() - t0:.0f}s", flush=True)


PROMPTS = ["The capital of France is", "Write a two-line story about a cat.",
           "What is 2 + 3?", "Name three colours.", "The sun rises in the"]


def prompts(model_dir=None, model=None, tok=None) -> list:
    """Answers to the fixed prompts (greedy, 48 tokens) of an exported model loaded by mlx-lm
    alone, or of a model and tokenizer given. MLX's quantized kernels are slow on the CPU backend
    (minutes per answer), so there the loaded model's quantized layers are dequantized to float32
    by mlx-lm's own ``dequantize_model``: the same weights, computed in float32."""
    import mlx.core as mx
    from mlx_lm import generate, load
    from mlx_lm.utils import dequantize_model

    if model is None:
        model, tok = load(str(model_dir))
        if mx.default_device() == mx.cpu:
            model = dequantize_model(model)
            model.set_dtype(mx.float32)
    out = []
    for p in PROMPTS:
        msgs = [{"role": "user", "content": p}]
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) \
            if getattr(tok, "chat_template", None) else p
        out.append((p, generate(model, tok, prompt=text, max_tokens=48, verbose=False)))
    return out


if __name__ == "__main__":
    main()
