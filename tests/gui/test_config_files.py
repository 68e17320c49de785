"""New / Open / Save / Save As of the configuration JSON (with its sidecar), dirty marker, prompts."""
import json

import pytest

pytest.importorskip("PySide6")

TIMEOUT_MS = 60_000


def _calibrate(window, qtbot, text):
    cal = window.calibration
    cal.text.set_path(str(text))
    cal.resume.setChecked(False)
    cal.set_settings(method="adam", preset="fast", seqs=4, seq_len=32, steps=2, batch=2)
    with qtbot.waitSignal(cal.finished, timeout=TIMEOUT_MS) as sig:
        cal.start()
    assert sig.args == ["done"]


def test_save_reopen_and_compare(make_window, tiny_model_dir, qtbot, tmp_path, tiny_text_file):
    w = make_window(tiny_model_dir)
    p = w.project
    p.edit_blocks([0, 2], "replicas", 2)
    p.edit_blocks([1], "strategy", "percentile")
    _calibrate(w, qtbot, tiny_text_file)
    assert p.dirty
    path = tmp_path / "cfg.json"
    with qtbot.waitSignal(w.config_saved, timeout=TIMEOUT_MS):
        assert w.save_as(str(path))
    assert not p.dirty and p.path == path and "*" not in w.windowTitle()
    assert w.windowTitle().startswith("cfg.json — ")
    d = json.loads(path.read_text())
    side = path.parent / d["tensors"]["file"]
    assert side.exists() and p.config.tensors_file == side.name
    saved = p.config

    w2 = make_window(tiny_model_dir)
    with qtbot.waitSignal(w2.config_opened, timeout=TIMEOUT_MS):
        w2.open_configuration(str(path))
    cfg = w2.project.config
    assert cfg.to_dict() == saved.to_dict()
    assert sorted(cfg.tensors) == sorted(saved.tensors)
    out = {}

    def compare(progress, cancel):  # MLX values are compared on the worker
        import numpy as np

        return all(np.array_equal(np.array(cfg.tensors[k]), np.array(saved.tensors[k])) for k in cfg.tensors)

    w2.run_job(compare, lambda r: out.setdefault("same", r))
    qtbot.waitUntil(lambda: "same" in out, timeout=TIMEOUT_MS)
    assert out["same"]
    assert not w2.project.dirty and w2.project.path == path
    assert str(path) in w2._recent("recent/configs")
    # Save (Ctrl+S) after an edit writes the same file again
    w2.project.edit_blocks([1], "replicas", 2)
    assert w2.windowTitle().startswith("cfg.json*")
    with qtbot.waitSignal(w2.config_saved, timeout=TIMEOUT_MS):
        w2.save_action.trigger()
    assert json.loads(path.read_text())["blocks"][1]["replicas"] == 2
    assert w2.save_action.shortcut().toString() == "Ctrl+S"


def test_invalid_json_leaves_the_config_untouched(window, qtbot, tmp_path):
    p = window.project
    p.edit_blocks([1], "replicas", 2)
    cfg, before, count = p.config, p.config.to_dict(), p.undo_stack.count()
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1, "model": ')
    with qtbot.waitSignal(window.config_failed, timeout=TIMEOUT_MS) as sig:
        window.open_configuration(str(bad))
    assert "malformed JSON" in sig.args[0] and str(bad) in sig.args[0]
    assert window.banner.isVisible() and "malformed JSON" in window.banner.text()
    assert p.config is cfg and cfg.to_dict() == before and p.undo_stack.count() == count and p.dirty
    wrong = tmp_path / "wrong.json"
    d = dict(before)
    d["model"] = dict(d["model"], num_blocks=7)
    wrong.write_text(json.dumps(d))
    with qtbot.waitSignal(window.config_failed, timeout=TIMEOUT_MS) as sig:
        window.open_configuration(str(wrong))
    assert "7 blocks" in sig.args[0] and p.config is cfg


def test_unsaved_edits_prompt_before_being_discarded(window, qtbot):
    p = window.project
    p.edit_blocks([0], "replicas", 2)
    asked = []
    window.confirm_discard = lambda: asked.append(1) or "cancel"
    assert not window.new_configuration({"bits": 3, "group_size": 64})
    assert asked and p.config.blocks[0].replicas == 2
    window.confirm_discard = lambda: "discard"
    assert window.new_configuration({"bits": 3, "group_size": 32, "replicas": 2, "mode": "parallel"})
    cfg = p.config
    assert cfg.defaults.bits == 3 and cfg.defaults.group_size == 32
    assert [b.replicas for b in cfg.blocks] == [2, 2, 2] and not p.dirty and p.path is None
    assert window.totals.values["bits_per_weight"] > 3.5
    # closing with unsaved edits asks too; "cancel" keeps the window open
    p.edit_blocks([0], "replicas", 1)
    window.confirm_discard = lambda: "cancel"
    assert not window.close() and window.isVisible()
    window.confirm_discard = lambda: "discard"
