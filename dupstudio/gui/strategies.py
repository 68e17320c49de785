"""One-line descriptions of the choices the window offers (tooltips in combo boxes)."""
from __future__ import annotations

from PySide6.QtCore import Qt

from dupstudio.core.calibration.settings import CODE_METHOD_HELP

STRATEGY_HELP = {
    "minmax": "The grid spans each group's smallest to largest weight (MLX's own rule; nothing clipped)",
    "symmetric": "A grid centred on zero, sized by the group's largest |w|",
    "percentile": "Clips each group's extreme 0.1 % of weights at both ends, then spans the rest",
    "ksigma": "Spans mean ± 3 standard deviations of each group (never beyond its min and max)",
    "trimmed": "Drops each group's 5 % smallest and largest weights, then spans the rest",
    "median": "Centres the grid on each group's median weight, wide enough for both extremes",
    "grid_offset": "The min-max grid shifted by half a step (zero is no longer a level)",
    "search": "Tries narrower ranges per group and keeps the one with the smallest weight error",
}
INIT_HELP = {
    "copy": "Replicas 2…K start as copies of the primary's scales and biases",
    "lsq": "Least-squares fit of each replica's scales and biases to what the primary misses",
    "gamma": "A narrower grid (scale × γ) around the same centre",
    "offset": "The primary's grid shifted by a fraction of a step",
    "strategy": "Scales and biases from another scale/zero strategy",
}
GRANULARITY_HELP = {
    "group": "Each replica has its own scale and bias per group of weights",
    "channel": "Each replica has one scale and offset per output row (fewer values, smaller)",
}
MODE_HELP = {
    "serial": "Replicas run one after another: h ← h + α (f(h) − h) for each",
    "parallel": "Replicas run on the same input and their updates are summed: h + Σ w (f(h) − h)",
}
CODES_HELP = CODE_METHOD_HELP  # the command line's --codes help reads the same
HELP = {"strategy": STRATEGY_HELP, "init": INIT_HELP, "granularity": GRANULARITY_HELP, "mode": MODE_HELP,
        "codes": CODES_HELP}


def describe(kind: str, value) -> str:
    return HELP.get(kind, {}).get(str(value), "")


def add_tooltips(combo, kind: str) -> None:
    """Give each item of ``combo`` (item data = the choice) its one-line description."""
    for i in range(combo.count()):
        tip = describe(kind, combo.itemData(i))
        if tip:
            combo.setItemData(i, tip, Qt.ToolTipRole)
