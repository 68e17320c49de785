"""How sizes are written for people, once for the CLI, the app and the messages of core:
decimal units (1 MB = 10⁶ bytes, as disks, downloads and the model cards count)."""
from __future__ import annotations

import math


def human_bytes(n) -> str:
    """``512 B``, ``1.5 KB``, ``98.2 MB``, ``1.23 GB``, ``2.00 TB``; ``—`` for None/NaN."""
    if n is None or not math.isfinite(float(n)):
        return "—"
    n = float(n)
    if abs(n) < 1000:
        return f"{n:.0f} B"
    for unit, scale in (("KB", 1e3), ("MB", 1e6), ("GB", 1e9)):
        if abs(n) < 1000 * scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e12:.2f} TB"
