"""``dupstudio sweep`` on the tiny model with fast settings."""
import json
import math

import pandas as pd

from dupstudio.cli import main
from dupstudio.core.testing import tiny_text


def test_sweep_writes_csv_json_pngs(tmp_path, tiny_model_dir, capsys):
    text = tmp_path / "text.txt"
    text.write_text(tiny_text(), encoding="utf-8")
    out = tmp_path / "sweep"
    code = main(["sweep", str(tiny_model_dir), "--budget-bpw", "2.6", "3.0", "--text-cal", str(text),
                   "--text-eval", str(text), "--out", str(out), "--windows", "2", "--ctx", "32",
                   "--seqs", "4", "--seq-len", "32", "--steps", "2", "--batch", "4",
                   "--kl-windows", "2", "--max-refine", "1",
                   "--extra", "k2-serial,k2-parallel,k2-serial-channel",
                   "--mlx-lm", "plain:2:64,mixed_2_6:2:64,gptq:2:32,dwq:2:64"])
    _, err = capsys.readouterr()
    assert code == 0, err
    df = pd.read_csv(out / "sweep.csv")
    names = list(df["name"])
    for want in ("RTN 2-bit g64", "RTN 3-bit g64", "RTN 4-bit g64", "calibrated K=1 2-bit g64",
                 "calibrated K=2 serial 2-bit g64", "calibrated K=2 parallel 2-bit g64",
                 "calibrated K=2 serial channel 2-bit g64", "search ≤2.6 bpw", "search ≤3 bpw",
                 "mlx-lm 2-bit g64", "mlx-lm mixed_2_6 g64", "mlx-lm GPTQ 2-bit g32"):
        assert want in names, want
    for col in ("ppl", "ppl_lo", "ppl_hi", "kl", "top1", "bits_per_weight", "latency_ms", "note"):
        assert col in df.columns
    ours = df[df["source"] == "dupstudio"]
    assert ours["ppl"].map(math.isfinite).all() and ours["latency_ms"].map(math.isfinite).all()
    ran = df[(df["source"] == "mlx-lm") & df["ppl"].notna()]  # mixed_2_6 included (per-matrix bits)
    assert len(ran) == 3 and ran["latency_ms"].map(math.isfinite).all()
    # an mlx-lm method that cannot run offline is a row with its reason
    dwq = df[df["name"].str.contains("DWQ")].iloc[0]
    assert math.isnan(dwq["ppl"]) and "hub" in dwq["note"]
    best = json.loads((out / "best.json").read_text())
    assert best["schema_version"] == 1 and best["provenance"]["sweep"]["budget_bpw"] == 2.6
    row = df[df["name"] == best["provenance"]["sweep"]["chosen"]].iloc[0]
    assert row["bits_per_weight"] <= 2.6 + 1e-9
    best3 = json.loads((out / "best_3.json").read_text())
    row3 = df[df["name"] == best3["provenance"]["sweep"]["chosen"]].iloc[0]
    assert row3["bits_per_weight"] <= 3.0 + 1e-9
    assert row3["ppl"] == df[(df["source"] == "dupstudio") & df["within_3"]]["ppl"].min()
    # the GPTQ g32 baseline sits at 3.0 bits/weight (2 bits + two float16 values per 32)
    assert abs(df[df["name"] == "mlx-lm GPTQ 2-bit g32"].iloc[0]["bits_per_weight"] - 3.0) < 1e-9
    md = (out / "summary.md").read_text()
    assert "best within 2.6 bits/weight" in md and "best within 3 bits/weight" in md and "RTN 3-bit" in md
    for png in ("ppl_vs_bpw.png", "ppl_vs_latency.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
        assert w >= 800 and h >= 500, (png, w, h)


def test_label_offsets_separate_close_points_and_leave_lone_ones():
    from dupstudio.plots import LABEL_STEP, label_offsets

    df = pd.DataFrame({"x": [2.5, 2.5, 2.5, 4.5], "ppl": [200.0, 210.0, 220.0, 50.0]},
                      index=[10, 11, 12, 13])
    offs = label_offsets(df, "x")
    assert offs[13] == 0  # far from the others
    ly = {i: math.log10(df.loc[i, "ppl"]) for i in df.index}
    yr = max(ly.values()) - min(ly.values())
    tops = sorted(ly[i] + offs[i] * yr * LABEL_STEP for i in (10, 11, 12))
    assert all(b - a >= 0.9 * yr * LABEL_STEP for a, b in zip(tops, tops[1:]))  # no two labels overlap
    assert sorted(abs(offs[i]) for i in (10, 11, 12))[0] == 0  # the first keeps its place
