"""`dupstudio quant-report` on the default model (slow: uses SmolLM2-135M)."""
import json
import math

import pytest

from dupstudio.cli import main


@pytest.mark.slow
def test_quant_report_default_model_2bit_vs_4bit(default_loaded, capsys):
    out = {}
    for bits in (2, 4):
        assert main(["quant-report", "--bits", str(bits), "--group", "64", "--json", "-"]) == 0
        out[bits] = json.loads(capsys.readouterr().out)
    rows = out[2]["matrices"]
    assert len(rows) == 210
    assert all(r["bits_per_weight"] == pytest.approx(2.5) for r in rows)
    sq2 = sum(r["sqnr_db"] for r in rows) / len(rows)
    sq4 = sum(r["sqnr_db"] for r in out[4]["matrices"]) / 210
    assert math.isfinite(sq2) and sq2 < sq4
