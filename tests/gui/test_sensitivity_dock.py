"""Tools ▸ Sensitivity… on the tiny model: bars per block, the table, cancel, errors, and
"Set K = 2 on the top blocks" as one undoable step."""
import pandas as pd
import pytest

TIMEOUT_MS = 60_000


@pytest.fixture
def fast():
    from dupstudio.core.calibrate import settings_from

    return settings_from("fast", seqs=4, seq_len=32, steps=2, batch=4)


def _values(text, fast, **kw):
    v = {"text": str(text), "blocks": None, "mode": "serial", "with_replica": True, "kl_windows": 2,
         "settings": fast}
    v.update(kw)
    return v


def test_sensitivity_action_shows_bars_per_block(window, qtbot, tiny_text_file, fast):
    p, panel = window.project, window.sensitivity
    before = p.config.to_dict()
    window.ask_sensitivity_settings = lambda: _values(tiny_text_file, fast)
    assert window.sensitivity_action.isEnabled() and not window.sensitivity_dock.isVisible()
    with qtbot.waitSignal(window.sensitivity_finished, timeout=TIMEOUT_MS) as sig:
        window.sensitivity_action.trigger()
        assert not window.sensitivity_action.isEnabled()
    assert sig.args == ["done"], window.error_message
    n = p.num_blocks
    assert window.sensitivity_dock.isVisible() and window.sensitivity_action.isEnabled()
    for series in ("kl_quantized", "kl_gain"):
        assert len(panel.plot.bars[series].opts["x"]) == n, series
    assert panel.table.rowCount() == n
    assert [panel.table.item(r, 0).text() for r in range(n)] == [str(k) for k in range(n)]
    assert float(panel.table.item(0, 1).text()) > 0
    assert "Sensitivity of 3 blocks" in window.status_text()
    assert p.config.to_dict() == before and not p.dirty  # measuring changes nothing


def test_sensitivity_subset_without_replica(window, qtbot, tiny_text_file, fast):
    panel = window.sensitivity
    with qtbot.waitSignal(window.sensitivity_finished, timeout=TIMEOUT_MS) as sig:
        assert window.run_sensitivity(_values(tiny_text_file, fast, blocks="2,0", with_replica=False))
    assert sig.args == ["done"], window.error_message
    assert sorted(panel.plot.bars["kl_quantized"].opts["x"]) == [0, 2] and "kl_gain" not in panel.plot.bars
    assert panel.table.rowCount() == 2 and not panel.apply_button.isEnabled()


def test_sensitivity_cancel(window, qtbot, tiny_text_file, fast):
    from dataclasses import replace

    panel = window.sensitivity
    slow = replace(fast, steps=60)
    with qtbot.waitSignal(window.sensitivity_finished, timeout=TIMEOUT_MS) as sig:
        assert window.run_sensitivity(_values(tiny_text_file, slow))
        qtbot.waitUntil(lambda: len(panel.rows) >= 1, timeout=TIMEOUT_MS)  # the first block streamed in
        panel.bar.cancel.click()
    assert sig.args == ["cancelled"]
    assert "cancelled" in window.status_text().lower() and window.error_message is None
    assert 1 <= len(panel.rows) < window.project.num_blocks and panel.table.rowCount() == len(panel.rows)
    assert window.sensitivity_action.isEnabled()


def test_sensitivity_errors_are_readable(window, qtbot, tmp_path, tiny_text_file, fast):
    assert not window.run_sensitivity(_values(tiny_text_file, fast, blocks="0,9"))
    assert window.error_message == "Sensitivity: blocks: 9 is not a block of this model (0-2)"
    missing = tmp_path / "nope.txt"
    with qtbot.waitSignal(window.sensitivity_finished, timeout=TIMEOUT_MS) as sig:
        assert window.run_sensitivity(_values(missing, fast))
    assert sig.args == ["failed"]
    assert window.error_message == f"Sensitivity failed: {missing}: no such text file"
    assert "no such text file" in window.sensitivity.bar.message.text()
    assert window.sensitivity_action.isEnabled()


def test_use_the_result_sets_k2_on_top_blocks_undoably(window, qtbot):
    from dupstudio.gui.panels.layers import COL

    p, panel, m = window.project, window.sensitivity, window.layers.model
    before = p.config.to_dict()
    df = pd.DataFrame({"block": [0, 1, 2], "kl_quantized": [0.3, 0.1, 0.05], "kl_k1": [0.2, 0.08, 0.04],
                       "kl_k2": [0.15, 0.081, 0.01], "kl_gain": [0.05, -0.001, 0.03]})
    panel.mode = "parallel"
    panel.show_result(df, "synthetic")
    panel.top_n.setValue(5)
    assert panel.top_blocks() == [0, 2] and panel.apply_button.isEnabled()
    assert "top 2 blocks" in panel.apply_button.text()
    panel.apply_button.click()
    assert [b.replicas for b in p.config.blocks] == [2, 1, 2]
    assert [b.mode for b in p.config.blocks][::2] == ["parallel", "parallel"]
    assert [m.index(k, COL["replicas"]).data() for k in range(3)] == ["2", "1", "2"]
    assert p.undo_stack.undoText() == "Sensitivity: K = 2 (parallel) on blocks 0, 2"
    assert window.tabs.currentWidget() is window.layers
    p.undo_stack.undo()
    assert p.config.to_dict() == before
    p.undo_stack.redo()
    assert [b.replicas for b in p.config.blocks] == [2, 1, 2]
    assert window.apply_sensitivity([0, 2], "parallel") == 0  # already so: nothing pushed
