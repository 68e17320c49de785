"""One unit convention for sizes shown to people: decimal (1 MB = 10⁶ bytes)."""
import math

from dupstudio.core.units import human_bytes


def test_human_bytes_decimal_units_and_edges():
    assert human_bytes(0) == "0 B"
    assert human_bytes(999) == "999 B"
    assert human_bytes(1000) == "1.0 KB"
    assert human_bytes(98_200_000) == "98.2 MB"
    assert human_bytes(1_230_000_000) == "1.2 GB"
    assert human_bytes(2e12) == "2.00 TB"
    assert human_bytes(None) == "—" and human_bytes(math.nan) == "—"
