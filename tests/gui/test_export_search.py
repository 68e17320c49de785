"""File ▸ Export model… and Tools ▸ Search… on the tiny model: the worker does the work, dialogs
are answered by overriding the window's ask/confirm methods."""
import pytest

pytest.importorskip("PySide6")

TIMEOUT_MS = 60_000


def test_export_action_writes_a_model_folder(window, qtbot, tmp_path):
    out = tmp_path / "exported"
    previews = []
    window.ask_export_dir = lambda *a, **k: str(out)
    window.confirm_export = lambda preview: previews.append(preview) or True
    assert window.export_action.isEnabled()
    with qtbot.waitSignal(window.export_finished, timeout=TIMEOUT_MS) as sig:
        window.export_action.trigger()
    assert sig.args == ["done"], window.error_message
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    p = previews[0]
    assert p["bytes"] > 0 and p["bits_per_weight"] == pytest.approx(2.5) and p["trust_remote_code"] is False
    assert str(out) in window.banner.text() and str(out) in window.status_text()
    assert window.export_action.isEnabled()


def test_export_cancelled_at_the_confirmation_writes_nothing(window, qtbot, tmp_path):
    parent = tmp_path / "exports"
    parent.mkdir()
    out = parent / "exported"
    window.ask_export_dir = lambda *a, **k: str(out)
    window.confirm_export = lambda preview: False
    with qtbot.waitSignal(window.export_finished, timeout=TIMEOUT_MS) as sig:
        assert window.export_model()
    assert sig.args == ["cancelled"]
    assert list(parent.iterdir()) == []  # no folder, no hidden partial one
    assert window.error_message is None


def test_export_into_a_non_empty_folder_is_a_readable_error(window, qtbot, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    asked = []
    window.confirm_export = lambda preview: asked.append(preview) or True
    with qtbot.waitSignal(window.export_finished, timeout=TIMEOUT_MS) as sig:
        window.export_model(str(out))
    assert sig.args == ["failed"] and not asked
    assert "not empty" in window.banner.text()
    assert sorted(f.name for f in out.iterdir()) == ["keep.txt"]


def test_search_action_replaces_the_config_undoably(window, qtbot, tiny_text_file):
    from dupstudio.core.calibrate import settings_from
    from dupstudio.gui.panels.layers import COL

    p, m = window.project, window.layers.model
    before = p.config
    before_dict = before.to_dict()
    st = settings_from("fast", seqs=4, seq_len=32, steps=2, batch=4)
    window.ask_search_settings = lambda: {"budget_bpw": 2.7, "budget_latency_ms": None,
                                          "text": str(tiny_text_file), "settings": st,
                                          "kl_windows": 2, "max_refine": 0}
    assert window.search_action.isEnabled()
    with qtbot.waitSignal(window.search_finished, timeout=TIMEOUT_MS) as sig:
        window.search_action.trigger()
        assert p.locked and not window.search_action.isEnabled()
    assert sig.args == ["done"], window.error_message
    after = p.config
    assert after is not before and not p.locked and window.search_action.isEnabled()
    assert "search" in after.provenance and after.provenance["search"]["budget_bpw"] == 2.7
    assert after.provenance["search"]["chosen"]  # 2.7 bits/weight leaves room for a g32 block
    assert any(b.replicas > 1 or b.group_size is not None for b in after.blocks)
    shown = [m.index(k, COL["replicas"]).data() for k in range(m.rowCount())]
    assert shown == [str(b.replicas) for b in after.blocks]
    assert "Search" in window.banner.text()
    assert p.undo_stack.undoText().startswith("Search (2.7")
    p.undo_stack.undo()
    assert p.config is before and p.config.to_dict() == before_dict
    assert [m.index(k, COL["replicas"]).data() for k in range(m.rowCount())] == ["1"] * m.rowCount()
    p.undo_stack.redo()
    assert p.config is after


def test_search_dialog_and_export_text(qtbot):
    from dupstudio.gui.main_window import SearchDialog, export_preview_text

    dlg = SearchDialog("/some/text.txt", "note")
    qtbot.addWidget(dlg)
    assert dlg.values() == {"budget_bpw": 2.5, "budget_latency_ms": None, "text": "/some/text.txt"}
    dlg.latency.setValue(3.5)
    assert dlg.values()["budget_latency_ms"] == 3.5
    t = export_preview_text({"bytes": 12_300_000, "bits_per_weight": 2.75, "trust_remote_code": True,
                             "reasons": ["K = 2 on block 1"]})
    assert "12.3 MB" in t and "2.750" in t and "--trust-remote-code" in t and "K = 2 on block 1" in t
