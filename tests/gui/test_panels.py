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
    assert q["label"] == "unsaved configuration" and "K=2" in q["details"]
    out = ev.export_csv(tmp_path / "runs.csv")
    rows = list(csv.DictReader(open(out)))
    assert [r["label"] for r in rows] == ["full precision", "unsaved configuration"]
    assert float(rows[1]["ppl"]) == pytest.approx(q["ppl"])


def _fake_machine(tmp_path, monkeypatch):
    """A measured profile for "this machine" without running the micro-benchmark: the M1 Pro's
    figures scaled down, saved where the app reads it."""
    from dataclasses import replace

    from dupstudio.core import machine_profile as MP
    from dupstudio.core import roofline as RF
    from dupstudio.gui import tasks

    path = tmp_path / "machine_profile.json"
    monkeypatch.setattr(MP, "profile_path", lambda: path)
    m1 = RF.get_profile(None)
    prof = replace(m1, name="machine", label="This machine (test CPU)", bandwidth_gbs=3.34, fp32_tflops=0.0347,
                   fp16_tflops=0.0347, quantized_matmul_tflops=0.00184, layer_floor_us=761.0, compute_dtype="float32",
                   meta={"date": "2025-01-01T00:00:00"})

    def job():
        def run(progress, cancel):
            MP.save(prof)
            return prof

        return run

    monkeypatch.setattr(tasks, "measure_machine_job", job)
    return prof


def test_roofline_tab_predicts_three_assumptions(window, qtbot):
    r = window.roofline
    window.project.edit_blocks([0, 1], "replicas", 2)
    window.tabs.setCurrentIndex(TABS.index("roofline"))
    r.set_mode("profile")
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


def test_roofline_this_machine_is_never_another_machine(window, qtbot, tmp_path, monkeypatch):
    """Before "this machine" is measured its view says so and offers Measure now (no M1 Pro
    stand-in); afterwards predictions and the measured latency share one log axis."""
    from dupstudio.core import machine_profile as MP

    monkeypatch.setattr(MP, "profile_path", lambda: tmp_path / "none.json")
    r = window.roofline
    r._load_machine()
    window.tabs.setCurrentIndex(TABS.index("roofline"))
    r.set_mode("machine")
    assert r.stack.currentIndex() == 1 and r.measure_now.isVisible() and r.measure_now.isEnabled()
    assert "not been measured" in r.empty_text.text()
    assert not r.results and not r.machine_results and r.table.rowCount() == 0
    assert "load_or_measure" not in r.note.text() + r.empty_text.text()

    prof = _fake_machine(tmp_path, monkeypatch)
    with qtbot.waitSignal(r.measured_ready, timeout=TIMEOUT_MS) as sig:
        r.measure_now.click()
    assert all(v > 0 for v in sig.args[0].values())
    assert r.stack.currentIndex() == 0 and r.mode() == "machine"
    assert r.machine_results and not r.results  # this machine only
    assert "this machine (test CPU)" in r.roof_plot.getPlotItem().titleLabel.text
    # measured latency: markers (no bars) beside this machine's predictions, in the read-out points
    from pyqtgraph import BarGraphItem

    items = r.lat_plot.getPlotItem().items
    assert not any(isinstance(i, BarGraphItem) for i in items)
    texts = [t for _x, _v, t in r.latency_points]
    assert sum("measured on this machine" in t for t in texts) == 3
    assert all("Apple" not in t for t in texts)
    # the roofline holds the measured decode points too (diamonds)
    assert any(getattr(i, "opts", {}).get("symbol") == "d" for i in r.roof_plot.getPlotItem().items)
    assert "measured here" in r.roof_plot.legend_label.text
    # units and three significant digits; no raw numbers
    note = r.note.text()
    assert "3.34 GB/s" in note and "34.7 GFLOP/s" in note and "1.84 GFLOP/s" in note and "761 µs" in note
    assert "TFLOPS" not in note and "0.00" not in note
    assert "ridge 0 " not in r.roof_plot.legend_label.text and "FLOP/B" in r.roof_plot.legend_label.text
    cells = [r.table.item(0, c).text() for c in range(r.table.columnCount())]
    assert cells[0] == "this machine" and cells[9].endswith("s")
    assert any(r.table.item(i, 11).text().endswith("ms") for i in range(r.table.rowCount()))

    # both overlaid: the profile's and this machine's predictions, measured beside this machine's
    r.set_mode("both")
    assert r.results and r.machine_results and r.table.rowCount() == 12
    texts = [t for _x, _v, t in r.latency_points]
    assert any("Apple M1 Pro" in t for t in texts) and any("test CPU" in t for t in texts)
    y = [v for _x, v, _t in r.latency_points]
    assert max(y) / min(y) > 10  # decades apart: a log axis
    assert r.lat_plot.getPlotItem().getAxis("left").logMode
    # the named profile alone: no measurement beside another computer's prediction
    r.set_mode("profile")
    texts = [t for _x, _v, t in r.latency_points]
    assert texts and not any("measured" in t and "this machine" in t for t in texts)
    assert "This machine" in r.note.text()  # where the measurement went
    del prof


def test_roofline_labels_never_overlap(window, qtbot, tmp_path, monkeypatch):
    """Ridge and point labels are in the legend below the chart, not drawn over it."""
    import pyqtgraph as pg

    _fake_machine(tmp_path, monkeypatch)
    r = window.roofline
    window.tabs.setCurrentIndex(TABS.index("roofline"))
    with qtbot.waitSignal(r.machine_ready, timeout=TIMEOUT_MS):
        r.measure_machine()
    r.set_mode("both")
    for plot in (r.roof_plot, r.lat_plot):
        assert not [i for i in plot.getPlotItem().items if isinstance(i, pg.TextItem)]
        assert plot.getPlotItem().legend is None  # nothing inside the axes
    assert r.roof_plot.legend_label.text.count("ridge") == 4


def test_distribution_legends_sit_below_the_data(window, qtbot):
    d = window.distributions
    window.tabs.setCurrentIndex(TABS.index("distributions"))
    window.project.edit_blocks([1], "replicas", 2)
    with qtbot.waitSignal(d.detail_ready, timeout=TIMEOUT_MS):
        d.show_block(1, "up_proj")
        d.schedule()
    qtbot.waitUntil(lambda: d.detail is not None and d.detail["block"] == 1, timeout=TIMEOUT_MS)
    for plot in (d.weights_plot, d.code_plot, d.error_plot):
        pi = plot.getPlotItem()
        assert pi.legend is None  # nothing drawn inside the axes
        assert "replica 2" in plot.legend_label.text
        # the legend is laid out below the view box, not over it
        assert plot.legend_label.sceneBoundingRect().top() >= pi.getViewBox().sceneBoundingRect().bottom()


def test_heat_map_is_absolute_reads_out_and_hatches_pending_blocks(window, qtbot):
    from PySide6.QtCore import QPointF

    d, p = window.distributions, window.project
    window.tabs.setCurrentIndex(TABS.index("distributions"))
    qtbot.waitUntil(window.metrics_idle, timeout=TIMEOUT_MS)
    d.update_heatmap()
    data = d.heat_data
    assert np.isfinite(data).all() and not d.heat_pending
    # an absolute scale from 0 %: its top is a round value above the largest error
    lo, hi = d.heat_bar.levels()
    from dupstudio.gui.widgets import NICE_TOPS

    assert lo == 0 and hi == d.heat_top >= data.max() and hi in NICE_TOPS
    assert f"0 – {hi:g} %" in d.heat_bar.getAxis("left").labelText
    # the lowest error is not drawn black: its colour is the scale's colour at value / top
    img = d.heat.image
    j, k = np.unravel_index(np.argmin(data), data.shape)
    assert tuple(img[j, k][:3]) != (0, 0, 0)
    # hover: block, matrix and value
    assert d.heat_text(2, 1).startswith("block 1 · v_proj: relative error")
    vb = d.heat_plot.getPlotItem().getViewBox()
    d._heat_hover(vb.mapViewToScene(QPointF(2.5, 1.5)))
    assert d.heat_readout.text().startswith("block 1 · v_proj")
    # a block being recomputed: grey and hatched, said in the title, not shaded as the lowest error
    window._metrics_timer.stop()
    p.edit_blocks([0], "strategy", "percentile")
    window._metrics_timer.stop()
    d.update_heatmap()
    assert np.isnan(d.heat_data[:, 0]).all() and len(d.heat_pending) == 1
    from dupstudio.gui import theme
    from PySide6.QtGui import QColor

    grey = QColor(theme.colors()["pending"])
    assert tuple(d.heat.image[0, 0][:3]) == (grey.red(), grey.green(), grey.blue())
    assert "still computing" in d.heat_plot.getPlotItem().titleLabel.text
    assert "still being computed" in d.heat_text(0, 0)
    window._schedule_metrics([0])
    qtbot.waitUntil(window.metrics_idle, timeout=TIMEOUT_MS)
    qtbot.waitUntil(lambda: not d.heat_pending, timeout=TIMEOUT_MS)


def test_evaluation_text_is_never_the_calibration_text_by_default(window, qtbot, tiny_text_file):
    from pyqtgraph import TextItem

    ev = window.evaluation
    assert ev.text.path() == ""  # no default: the bundled text is the calibration text
    asked = []
    window.ask_text_file = lambda caption: asked.append(caption) or None
    assert not ev.start(full_precision=True) and asked == ["Choose an evaluation text"]
    # the calibration text: a visible warning, and the run says so
    window.calibration.text.set_path(str(tiny_text_file))
    ev.text.set_path(str(tiny_text_file))
    assert not ev.same_text.isHidden() and "calibration text" in ev.same_text.text()
    ev.windows.setValue(2)
    ev.ctx.setValue(32)
    with qtbot.waitSignal(ev.finished, timeout=TIMEOUT_MS):
        ev.start()
    assert ev.rows[-1]["label"] == "unsaved configuration (on the calibration text)"
    ev.text.set_path("")
    assert ev.same_text.isHidden()
    # the bar labels sit inside the axes (none clipped), runs named below
    pi = ev.plot.getPlotItem()
    (_x0, _x1), (y0, y1) = pi.getViewBox().viewRange()
    labels = [i for i in pi.items if isinstance(i, TextItem)]
    assert labels and all(y0 < t.pos().y() < y1 for t in labels)
    assert "#1 unsaved configuration" in ev.plot.legend_label.text
