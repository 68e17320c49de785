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


def test_export_text_names_the_standard_architecture():
    from dupstudio.gui.main_window import export_preview_text

    t = export_preview_text({"bytes": 1e6, "bits_per_weight": 2.5, "trust_remote_code": False,
                             "architecture": "qwen3", "reasons": []})
    assert "standard mlx-lm qwen3 model" in t


def test_export_confirmation_is_a_summary_and_warns_when_uncalibrated(window, qtbot, tmp_path):
    from dupstudio.gui.main_window import export_preview_text

    p = window.project
    p.edit_blocks([0, 1, 2], "replicas", 2)
    previews = []
    window.confirm_export = lambda preview: previews.append(preview) or False
    with qtbot.waitSignal(window.export_finished, timeout=TIMEOUT_MS):
        window.export_model(str(tmp_path / "out"))
    pv = previews[0]
    text = export_preview_text(pv)
    assert len(text.splitlines()) <= 3 and "K = 2 (serial) on blocks 0–2" in text
    assert "block 1:" not in text  # no list of one line per block
    w = pv["checks"]["warnings"]
    assert len(w) == 1 and "3 of 3 replicated blocks are not calibrated" in w[0]


def test_export_of_a_many_block_config_stays_short():
    from types import SimpleNamespace as NS

    from dupstudio.gui.main_window import export_checks, export_preview_text

    blocks = [NS(index=i, replicas=2 if i < 16 else 1, mode="serial", calibration={"accepted": True} if i < 16
                 else None, residual_gain=1.0 if i != 20 else 0.9) for i in range(30)]
    checks = export_checks(NS(blocks=blocks))
    assert checks["warnings"] == []
    text = export_preview_text({"bytes": 9e7, "bits_per_weight": 2.8, "trust_remote_code": True,
                                "reasons": [f"block {i}: K = 2 (serial)" for i in range(16)], "checks": checks})
    assert "K = 2 (serial) on blocks 0–15; β ≠ 1 on block 20" in text and len(text) < 250


def test_file_dialogs_start_in_the_last_folder_else_home(window, tmp_path, monkeypatch):
    from pathlib import Path

    from dupstudio.gui.main_window import MainWindow

    window.settings.remove("paths/last_dir")
    assert window.start_dir() == str(Path.home())
    seen = []
    monkeypatch.setattr("dupstudio.gui.main_window.QFileDialog.getSaveFileName",
                        lambda parent, caption, start, *a, **k: (seen.append(start), ("", ""))[1])
    MainWindow.ask_save_path(window, "Save", "cfg.json", "*.json")
    assert seen[-1] == str(Path.home() / "cfg.json")
    window.settings.setValue("paths/last_dir", str(tmp_path))
    MainWindow.ask_save_path(window, "Save", "cfg.json", "*.json")
    assert seen[-1] == str(tmp_path / "cfg.json")


def test_saved_configuration_follows_the_umask(window, qtbot, tmp_path):
    import os
    import stat

    window.project.edit_blocks([0], "replicas", 2)
    old = os.umask(0o022)
    try:
        path = tmp_path / "cfg.json"
        with qtbot.waitSignal(window.config_saved, timeout=TIMEOUT_MS):
            assert window.save_as(str(path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
