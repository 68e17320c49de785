"""Streamed generation from the configuration (deploy mode), side by side with full precision; Stop."""
import pytest

pytest.importorskip("PySide6")

TIMEOUT_MS = 60_000


def test_generate_side_by_side(window, qtbot):
    g = window.generation
    window.project.edit_blocks([1], "replicas", 2)
    g.max_tokens.setValue(6)
    g.side.setChecked(True)
    with qtbot.waitSignal(g.finished, timeout=TIMEOUT_MS) as sig:
        assert g.start()
    assert sig.args == ["done"]
    assert g.stats["config"]["tokens"] >= 1 and g.stats["fp"]["tokens"] >= 1
    assert g.text("config") and g.text("fp")
    assert "tokens/s" in g.outputs["config"].stats.text()
    assert g.go.isEnabled() and not g.stop_button.isEnabled()


def test_generation_stops(window, qtbot):
    g = window.generation
    g.max_tokens.setValue(5000)
    g.side.setChecked(False)
    g.token_received.connect(lambda _w: g.stop())
    with qtbot.waitSignal(g.finished, timeout=TIMEOUT_MS) as sig:
        g.start()
        assert g.stop_button.isEnabled()
    assert sig.args == ["stopped"]
    assert 0 < len(g.text("config")) and g.stats == {}
    assert "stopped" in g.outputs["config"].stats.text()
    assert g.go.isEnabled()
