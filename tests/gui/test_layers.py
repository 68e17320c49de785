"""The layer table: one row per block over the project's one Config; in-place edits, apply to
many rows, undo/redo, totals."""
import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtWidgets import QComboBox  # noqa: E402

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
    assert isinstance(ed, QComboBox) and [ed.itemData(i) for i in range(ed.count())] == [1, 2, 3, 4]
    delegate.setEditorData(ed, idx)
    ed.setCurrentIndex(ed.findData(3))
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
    p.edit_blocks([0], "replicas", 2)
    before = p.config.to_dict()
    count = p.undo_stack.count()
    assert not m.setData(m.index(0, COL["gains"]), "1, 2, 3")  # K = 2 needs two values
    assert "2 values of α are needed" in m.last_refusal and "2 values" in window.status_text()
    assert p.config.to_dict() == before and p.undo_stack.count() == count


@pytest.mark.parametrize("col, value, why", [
    ("gains", "3, 0.5", "fixed at 1"),  # serial: the first α is the primary's, never silently 1
    ("gains", "1, -0.5", "between 0 and 2"),  # a negative gain
    ("gains", "1, 2.5", "between 0 and 2"),
    ("gains", "1", "2 values"),
    ("gains", "1, x", "must be a number"),
    ("residual_gain", "-1", "between 0 and 2"),
    ("residual_gain", "nan", "finite"),
    ("residual_gain", "abc", "must be a number"),
])
def test_every_editable_cell_is_validated(window, col, value, why):
    m, p = window.layers.model, window.project
    p.edit_blocks([1], "replicas", 2)
    before, count = p.config.to_dict(), p.undo_stack.count()
    refused = []
    m.cell_refused.connect(lambda r, c, msg: refused.append((r, c, msg)))
    assert not m.setData(m.index(1, COL[col]), value)
    assert refused and refused[0][:2] == (1, COL[col]) and why in refused[0][2]
    assert why in window.status_text()  # the reason is shown, and nothing changed
    assert p.config.to_dict() == before and p.undo_stack.count() == count


def test_valid_gains_in_both_modes(window):
    m, cfg = window.layers.model, window.project.config
    window.project.edit_blocks([1], "replicas", 2)
    assert m.setData(m.index(1, COL["gains"]), "1, 0.25")
    assert cfg.blocks[1].gains == [1.0, 0.25]
    assert m.setData(m.index(1, COL["mode"]), "parallel")
    assert m.setData(m.index(1, COL["gains"]), "0.7 0.3")
    assert cfg.blocks[1].gains == [0.7, 0.3]
    assert m.setData(m.index(1, COL["residual_gain"]), "0.9")
    assert cfg.blocks[1].residual_gain == 0.9
    # K = 1: no replica gains to edit, and the tooltip says why
    assert not (m.flags(m.index(0, COL["gains"])) & Qt.ItemIsEditable)
    assert "K = 1" in m.index(0, COL["gains"]).data(Qt.ToolTipRole)


def test_edits_are_refused_while_a_calibration_owns_the_config(window):
    p, m, panel = window.project, window.layers.model, window.layers
    p.set_locked(True)
    assert not (m.flags(m.index(0, COL["replicas"])) & Qt.ItemIsEditable)
    assert not panel.lock_note.isHidden() and "read-only" in panel.lock_note.text()
    assert "read-only" in m.index(0, COL["replicas"]).data(Qt.ToolTipRole)
    assert not m.setData(m.index(0, COL["replicas"]), 2)
    assert "read-only" in window.status_text()
    panel._double_clicked(m.index(0, COL["mode"]))  # a double click says why nothing opens
    assert "read-only" in window.status_text()
    assert not panel.apply_bar.apply_button.isEnabled()
    p.set_locked(False)
    assert panel.lock_note.isHidden()
    assert m.setData(m.index(0, COL["replicas"]), 2)


def test_copy_rows_as_tsv_and_paste_settings(window, qtbot):
    from PySide6.QtGui import QGuiApplication

    p, panel = window.project, window.layers
    p.edit_blocks([0], "replicas", 2)
    p.edit_blocks([0], "init", "lsq")
    p.edit_blocks([0], "strategy", "percentile")
    panel.apply_bar.select_rows([0])
    panel.view.setFocus()
    panel.copy_action.trigger()  # Ctrl+C
    text = QGuiApplication.clipboard().text()
    lines = text.strip("\n").split("\n")
    assert lines[0].split("\t")[:3] == ["Block", "Parameters", "Bits / weight"]
    assert len(lines) == 2 and lines[1].split("\t")[COL["strategy"]] == "percentile"
    assert "Copied 1 row" in window.status_text()
    count = p.undo_stack.count()
    panel.apply_bar.select_rows([1, 2])
    assert panel.paste() == 2  # Ctrl+V: the copied row's settings onto blocks 1 and 2
    for k in (1, 2):
        b = p.config.blocks[k]
        assert b.replicas == 2 and b.replica[1].init == "lsq" and b.strategy == "percentile"
    assert p.undo_stack.count() == count + 1  # one step
    p.undo_stack.undo()
    assert [b.replicas for b in p.config.blocks] == [2, 1, 1]
    # a paste with an invalid value changes nothing
    bad = text.replace("percentile", "nonsense")
    assert panel.paste(bad) == 0 and p.undo_stack.count() == count + 1
    assert "Nothing pasted" in window.banner.text()


def test_k_editor_is_roomy(window):
    view, m = window.layers.view, window.layers.model
    view.edit(m.index(0, COL["replicas"]))
    ed = view.indexWidget(m.index(0, COL["replicas"])) or view.findChild(QComboBox)
    assert isinstance(ed, QComboBox) and ed.width() >= 120
    assert ed.itemText(0) == "1 (no replicas)"


def test_paste_keeps_structure_when_a_calibrated_gain_is_out_of_range(window):
    """A calibrated α can be slightly negative; pasting such a row still sets K, mode, init…,
    and says which value was left out."""
    p, panel = window.project, window.layers
    p.edit_blocks([0], "replicas", 2)
    p.config.blocks[0].gains = [1.0, -0.005]  # as calibration may leave it
    from dupstudio.gui.widgets import rows_as_tsv

    panel.apply_bar.select_rows([0])
    text = rows_as_tsv(panel.view)
    panel.apply_bar.select_rows([2])
    assert panel.paste(text) == 1
    assert p.config.blocks[2].replicas == 2 and p.config.blocks[2].gains == [1.0, 1.0]
    assert "not pasted: block 2: α/w" in window.status_text()
