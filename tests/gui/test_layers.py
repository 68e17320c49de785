"""The layer table: one row per block over the project's one Config; in-place edits, apply to
many rows, undo/redo, totals."""
import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtWidgets import QComboBox, QSpinBox  # noqa: E402

from dupstudio.gui.panels.layers import COL  # noqa: E402


def test_table_wraps_the_config_and_shows_weight_error(window):
    m = window.layers.model
    cfg = window.project.config
    assert m.rowCount() == 3 and m.project.config is cfg
    assert m.index(0, COL["bpw"]).data() == "2.500"
    assert m.index(0, COL["replicas"]).data() == "1"
    assert m.index(0, COL["strategy"]).data() == "minmax"
    rel = m.index(2, COL["rel"]).data()
    assert rel.endswith("%") and 0 < float(rel.split()[0]) < 100
    assert float(m.index(2, COL["sqnr"]).data()) > 0
    heat = window.distributions.heat_data
    assert heat.shape == (7, 3) and (heat > 0).all()


def test_edit_cells_then_undo_and_redo(window, qtbot):
    p, m = window.project, window.layers.model
    cfg = p.config
    assert not p.dirty and "*" not in window.windowTitle()
    assert m.setData(m.index(1, COL["replicas"]), 2)
    assert p.config is cfg and cfg.blocks[1].replicas == 2 and cfg.blocks[1].gains == [1.0, 1.0]
    assert p.dirty and window.windowTitle().startswith("untitled*")
    assert float(m.index(1, COL["bpw"]).data()) == pytest.approx(3.0)  # a second set of scales/biases
    assert window.totals.values["passes"] == 4
    assert m.setData(m.index(1, COL["mode"]), "parallel")
    assert cfg.blocks[1].mode == "parallel" and cfg.blocks[1].gains == [0.5, 0.5]
    assert m.setData(m.index(1, COL["gains"]), "0.7, 0.3")
    assert cfg.blocks[1].gains == [0.7, 0.3]
    assert m.setData(m.index(0, COL["strategy"]), "percentile")
    assert cfg.blocks[0].strategy == "percentile"
    assert m.index(0, COL["rel"]).data() == "…"  # recomputed on the worker
    qtbot.waitUntil(lambda: m.index(0, COL["rel"]).data() != "…", timeout=30_000)

    stack = p.undo_stack
    assert stack.count() == 4
    window.undo_action.trigger()  # Ctrl+Z
    assert cfg.blocks[0].strategy is None
    window.undo_action.trigger()
    assert cfg.blocks[1].gains == [0.5, 0.5]
    window.undo_action.trigger()
    window.undo_action.trigger()
    assert cfg.blocks[1].replicas == 1 and not p.dirty and "*" not in window.windowTitle()
    assert m.index(1, COL["replicas"]).data() == "1"
    window.redo_action.trigger()  # Ctrl+Shift+Z
    assert cfg.blocks[1].replicas == 2 and p.dirty
    assert [s.toString() for s in window.undo_action.shortcuts()] == ["Ctrl+Z"]
    assert "Ctrl+Shift+Z" in [s.toString() for s in window.redo_action.shortcuts()]


def test_delegates_edit_in_place(window):
    view, m = window.layers.view, window.layers.model
    delegate = view.itemDelegate()
    idx = m.index(2, COL["replicas"])
    ed = delegate.createEditor(view.viewport(), None, idx)
    assert isinstance(ed, QSpinBox) and ed.maximum() == 4
    delegate.setEditorData(ed, idx)
    ed.setValue(3)
    delegate.setModelData(ed, m, idx)
    assert window.project.config.blocks[2].replicas == 3
    idx = m.index(2, COL["init"])
    assert m.flags(idx) & Qt.ItemIsEditable
    ed = delegate.createEditor(view.viewport(), None, idx)
    assert isinstance(ed, QComboBox) and ed.findData("lsq") >= 0
    ed.setCurrentIndex(ed.findData("lsq"))
    delegate.setModelData(ed, m, idx)
    assert [r.init for r in window.project.config.blocks[2].replica] == ["copy", "lsq", "lsq"]
    assert not (m.flags(m.index(0, COL["init"])) & Qt.ItemIsEditable)  # K = 1: nothing to init
    idx = m.index(0, COL["group_size"])
    ed = delegate.createEditor(view.viewport(), None, idx)
    assert [ed.itemData(i) for i in range(ed.count())] == [32, 64, 128]


def test_apply_to_selected_rows_is_one_undo_step(window):
    bar, p = window.layers.apply_bar, window.project
    bar.select_rows([0, 2])
    assert bar.selected_rows() == [0, 2] and "2 rows" in bar.count.text()
    bar.field.setCurrentIndex(bar.field.findData("replicas"))
    bar.value.setCurrentIndex(bar.value.findData(3))
    assert bar.apply()
    assert [b.replicas for b in p.config.blocks] == [3, 1, 3]
    bar.field.setCurrentIndex(bar.field.findData("granularity"))
    bar.value.setCurrentIndex(bar.value.findData("channel"))
    bar.select_rows([0, 1, 2])
    assert bar.apply()  # block 1 has K = 1: skipped
    assert [r.granularity for r in p.config.blocks[0].replica] == ["group", "channel", "channel"]
    assert p.undo_stack.count() == 2
    p.undo_stack.undo()
    p.undo_stack.undo()
    assert [b.replicas for b in p.config.blocks] == [1, 1, 1]


def test_invalid_edit_shows_a_message_and_changes_nothing(window):
    m, p = window.layers.model, window.project
    before = p.config.to_dict()
    assert not m.setData(m.index(0, COL["gains"]), "1, 2, 3")  # K = 1 needs one gain
    assert "1 gains are needed" in window.banner.text()
    assert p.config.to_dict() == before and p.undo_stack.count() == 0


def test_edits_are_refused_while_a_calibration_owns_the_config(window):
    p, m = window.project, window.layers.model
    p.set_locked(True)
    assert not (m.flags(m.index(0, COL["replicas"])) & Qt.ItemIsEditable)
    assert not m.setData(m.index(0, COL["replicas"]), 2)
    assert "calibration is running" in window.banner.text()
    p.set_locked(False)
    assert m.setData(m.index(0, COL["replicas"]), 2)
