"""Distributions, evaluation (with CSV export) and roofline tabs on the tiny model."""
import csv

import numpy as np
import pytest

pytest.importorskip("PySide6")

from dupstudio.gui.main_window import TABS  # noqa: E402

TIMEOUT_MS = 60_000


def test_distributions_show_replica_grids_and_preview_a_strategy(window, qtbot):
    p, d = window.project, window.distributions
    p.edit_blocks([1], "replicas", 2)
    p.edit_blocks([1], "init", "gamma")
    window.tabs.setCurrentIndex(TABS.index("distributions"))
    with qtbot.waitSignal(d.detail_ready, timeout=TIMEOUT_MS) as sig:
        d.show_block(1, "up_proj")
        d.schedule()
    det = sig.args[0]
    while det["block"] != 1 or det["matrix"] != "up_proj":
        with qtbot.waitSignal(d.detail_ready, timeout=TIMEOUT_MS) as sig:
            pass
        det = sig.args[0]
    assert len(det["levels"]) == 2 and all(len(lv) == 4 for lv in det["levels"])
    assert det["levels"][0] != det["levels"][1]  # gamma init: a narrower grid
    assert det["weight_counts"].sum() + det["weight_outside"] == 512 * 256
    assert det["weight_outside"] < 100
    assert len(det["error_counts"]) == 2
    # the plots hold items (not empty)
    assert len(d.weights_plot.getPlotItem().items) > 8
    rel = det["stats"][0]["rel_fro"]
    with qtbot.waitSignal(d.detail_ready, timeout=TIMEOUT_MS) as sig:
        d.strategy.setCurrentIndex(d.strategy.findData("percentile"))
    assert sig.args[0]["stats"][0]["rel_fro"] != rel
    assert "(preview)" in d.info.text()
    assert p.config.blocks[1].strategy is None  # a preview does not edit
    d.apply_strategy.click()
    assert p.config.blocks[1].strategy == "percentile"
    assert np.isfinite(d.heat_data).any()


def test_evaluation_table_and_csv(window, qtbot, tiny_text_file, tmp_path):
    ev = window.evaluation
    ev.text.set_path(str(tiny_text_file))
    ev.windows.setValue(2)
    ev.ctx.setValue(32)
    with qtbot.waitSignal(ev.finished, timeout=TIMEOUT_MS):
        ev.start(full_precision=True)
    window.project.edit_blocks([0], "replicas", 2)
    with qtbot.waitSignal(ev.finished, timeout=TIMEOUT_MS) as sig:
        ev.start()
    assert sig.args == ["done"]
    assert ev.table.rowCount() == 2
    fp, q = ev.rows
    assert fp["label"] == "full precision" and fp["kl"] is None
    assert q["ppl"] > 1 and q["kl"] is not None and 0 <= q["top1_agreement"] <= 1
    assert q["label"] == "untitled*" and "K=2" in q["details"]
    out = ev.export_csv(tmp_path / "runs.csv")
    rows = list(csv.DictReader(open(out)))
    assert [r["label"] for r in rows] == ["full precision", "untitled*"]
    assert float(rows[1]["ppl"]) == pytest.approx(q["ppl"])


def test_roofline_tab_predicts_three_assumptions(window, qtbot):
    r = window.roofline
    window.project.edit_blocks([0, 1], "replicas", 2)
    window.tabs.setCurrentIndex(TABS.index("roofline"))
    qtbot.waitUntil(lambda: "config" in r.results, timeout=TIMEOUT_MS)
    res = r.results["config"]
    assert set(res.decode) == {"cache", "measured", "dram"}
    assert res.decode["dram"].predicted_ms >= res.decode["cache"].predicted_ms
    assert res.passes["decode"] == 5
    assert r.table.rowCount() == 6
    assert r.profile.itemText(0).startswith("Apple M1 Pro")
    assert len(r.roof_plot.getPlotItem().items) > 3
    # the totals strip shows the same M1 Pro prediction
    assert window.totals.values["predicted_ms"]["cache"] == pytest.approx(res.decode["cache"].predicted_ms)
    with qtbot.waitSignal(r.measured_ready, timeout=TIMEOUT_MS) as sig:
        r.measure()
    assert all(v > 0 for v in sig.args[0].values())
    # "this machine": the tests' DUPSTUDIO_HOME holds no measured profile, so a clear note
    i = r.profile.findData("machine")
    assert i >= 0
    if r.profile.model().item(i).isEnabled():
        r.profile.setCurrentIndex(i)
        assert "no measured profile" in r.note.text()
