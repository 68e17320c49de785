"""The app on a model whose matrix list is not llama's: phi3 (fused qkv_proj and gate_up_proj)."""
import numpy as np
import pytest

pytest.importorskip("PySide6")

from dupstudio.gui.main_window import TABS  # noqa: E402

TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory):
    from dupstudio.core.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("phi3") / "tiny-phi3", "phi3")


def test_phi3_distributions_heat_map_and_tooltips_follow_its_matrices(make_window, phi3_dir, qtbot):
    w = make_window(phi3_dir)
    d, p = w.distributions, w.project
    names = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert [d.matrix.itemText(i) for i in range(d.matrix.count())] == names
    w.tabs.setCurrentIndex(TABS.index("distributions"))
    qtbot.waitUntil(w.metrics_idle, timeout=TIMEOUT_MS)
    d.update_heatmap()
    assert d.heat_data.shape == (4, 3) and np.isfinite(d.heat_data).all()
    assert d.heat_text(0, 1).startswith("block 1 · qkv_proj")
    with qtbot.waitSignal(d.detail_ready, timeout=TIMEOUT_MS) as sig:
        d.show_block(2, "gate_up_proj")
        d.schedule()
    det = sig.args[0]
    while det["block"] != 2 or det["matrix"] != "gate_up_proj":
        with qtbot.waitSignal(d.detail_ready, timeout=TIMEOUT_MS) as sig:
            pass
        det = sig.args[0]
    assert det["weight_counts"].sum() + det["weight_outside"] == 1024 * 256
    m = p.metrics_for(0)
    assert list(m["matrices"]) == names
