"""Calibrate (full preset) a K=1 and a K=2 configuration of the default model, export both as
mlx-lm folders, and measure each export through mlx-lm's own loader in a separate interpreter
that cannot import dupstudio (a check that the export stands alone). Prints a markdown table.

Usage: python scripts/export_check.py --out DIR [--preset full] [--windows 16]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DUPSTUDIO_DATA", ROOT.parent / "shared" / "data"))

CHILD = textwrap.dedent("""
    import json, sys, numpy as np, mlx.core as mx
    try:
        import dupstudio  # noqa
        print("dupstudio importable!", file=sys.stderr); sys.exit(3)
    except ImportError:
        pass
    from mlx_lm import load, generate
    path, toks, trust = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    model, tok = load(path, model_config={}, **({"trust_remote_code": True} if trust else {}))
    from mlx.utils import tree_map
    model.update(tree_map(lambda a: a.astype(mx.float32) if a.dtype in (mx.float16, mx.bfloat16) else a,
                          model.parameters()))
    w = np.load(toks)
    tot, n = 0.0, 0
    for i in range(0, len(w), 4):
        x = mx.array(w[i:i+4])
        lg = model(x[:, :-1]).astype(mx.float32)
        lp = lg - mx.logsumexp(lg, -1, keepdims=True)
        tot += float(-mx.take_along_axis(lp, x[:, 1:, None], -1).sum()); n += x[:, 1:].size
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    text = generate(model, tok, prompt, max_tokens=24)
    print(json.dumps({"ppl": float(np.exp(tot / n)), "text": text}))
""")


def main():
    from dupstudio.core import config as C
    from dupstudio.core.calibrate import calibrate, settings_from
    from dupstudio.core.evaluate import evaluate, make_windows, read_text, tokenize
    from dupstudio.core.export import export_model
    from dupstudio.core.model_io import model_shape, open_model
    from dupstudio.core.replicate import build

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="full")
    ap.add_argument("--windows", type=int, default=16)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    L = open_model(None)
    shp = model_shape(L.config)
    ev = make_windows(tokenize(L.tokenizer, read_text(DATA / "wikitext2-test.txt")), 512, a.windows)
    np_path = out / "windows.npy"
    __import__("numpy").save(np_path, ev)
    cal_toks = tokenize(L.tokenizer, read_text(DATA / "wikitext2-valid.txt"))
    s = settings_from(a.preset)
    rows = []
    for name, kw in (("k1", dict(replicas=1)),
                     ("k2s_ch", dict(replicas=2, mode="serial", granularity="channel"))):
        cfg = C.new_config(shp, source="default", **kw)
        cfg = calibrate(L, cfg, make_windows(cal_toks, s.seq_len, s.seqs), s)
        C.save(cfg, out / f"{name}.json")
        ours = evaluate(build(L, cfg, "deploy"), ev)
        info = export_model(L, cfg, out / f"export_{name}", ppl=ours, overwrite=True)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        site = [p for p in sys.path if p.endswith("site-packages") or p.endswith("/tmp/site")]
        env["PYTHONPATH"] = os.pathsep.join(site)
        r = subprocess.run([sys.executable, "-S", "-c", "import sys; sys.path[:0] = "
                            + repr(site) + "\n" + CHILD, str(out / f"export_{name}"), str(np_path),
                            "1" if info["trust_remote_code"] else "0"],
                           capture_output=True, text=True, cwd="/", env=env, timeout=900)
        child = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-800:]}
        rows.append({"config": name, "bpw": info["bits_per_weight"], "bytes_on_disk": info["bytes"],
                     "trust_remote_code": info["trust_remote_code"], "ppl_dupstudio_deploy": ours.ppl,
                     **{f"mlx_lm_{k}": v for k, v in child.items()}})
        print(json.dumps(rows[-1]), flush=True)
    (out / "export_check.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
