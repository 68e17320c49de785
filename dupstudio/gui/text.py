"""User-facing text: error messages cleaned of programmer notation, and numbers with units.

Core errors are written for the command line; a few carry Python notation (a bytes literal such as
``b'oNo0'``, exception class names, a hub library's message repeated inside our own). The window
shows them through :func:`user_message`, once.
"""
from __future__ import annotations

import math
import re
from typing import Optional

_BYTES = re.compile(r"""\bb(['"])((?:\\.|(?!\1).)*?)\1""")
_EXC_PREFIX = re.compile(r"\b(?:[A-Z][A-Za-z]+(?:Error|Exception|Warning)|Got):\s*")
_NETWORK = ("name or service not known", "internet connection", "connecterror", "connection refused",
            "temporary failure in name resolution", "network is unreachable", "timed out")
_NOT_FOUND = ("repositorynotfound", "404", "repository not found", "is not a valid model identifier")


def _unbytes(m: re.Match) -> str:
    body = m.group(2)
    try:
        raw = bytes(body, "latin-1").decode("unicode_escape").encode("latin-1")
        shown = "".join(chr(c) if 32 <= c < 127 else "·" for c in raw)
    except (UnicodeDecodeError, UnicodeEncodeError, ValueError):
        shown = body
    return f"“{shown}”"


def _dedupe_sentences(text: str) -> str:
    parts = re.split(r"(?<=[.!?])\s+", text)
    seen, out = set(), []
    for p in parts:
        key = p.strip().lower().rstrip(".")
        if key and key in seen:
            continue
        seen.add(key)
        out.append(p)
    return " ".join(out)


def _hub_reason(inner: str) -> str:
    low = inner.lower()
    if any(s in low for s in _NETWORK):
        return "the hub could not be reached; check the network connection"
    if any(s in low for s in _NOT_FOUND):
        return "no such repository on the hub, or it is private"
    inner = _EXC_PREFIX.sub("", inner).strip()
    first = re.split(r"(?<=[.!?])\s+", inner)[0]
    return first[:160]


def user_message(text: Optional[str]) -> str:
    """``text`` as a person reads it: bytes literals as quoted characters, a hub failure in one
    short clause (no library exception names), no sentence twice."""
    if not text:
        return ""
    t = " ".join(str(text).split())
    t = _BYTES.sub(_unbytes, t)
    m = re.search(r"(from the Hugging Face hub) \((.*)\)\s*$", t)
    if m:
        t = t[:m.start()] + f"{m.group(1)}: {_hub_reason(m.group(2))}"
    return _dedupe_sentences(t)


# --------------------------------------------------------------------------- numbers with units
_PREFIXES = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""), (1e-3, "m"), (1e-6, "µ"), (1e-9, "n")]


def sig3(x: float) -> str:
    """``x`` with three significant digits, no exponent for ordinary magnitudes (1.23, 45.6, 789,
    12,300)."""
    if x is None or not math.isfinite(x):
        return "—"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    x = round(x, -(mag - 2))  # three significant digits (may carry into the next decade)
    mag = math.floor(math.log10(abs(x)))
    if mag >= 3:
        return f"{round(x, -(mag - 2)):,.0f}"
    decimals = max(0, 2 - mag)
    return f"{x:.{decimals}f}"


def fmt_si(x: Optional[float], unit: str) -> str:
    """``x`` (in base units) with an SI prefix and three significant digits: 2.28e9, "FLOP/s" ->
    "2.28 GFLOP/s"; 0.00441, "s" -> "4.41 ms"."""
    if x is None or not math.isfinite(x):
        return "—"
    if x == 0:
        return f"0 {unit}"
    for f, p in _PREFIXES:
        if abs(x) >= f * 0.9995:
            v = x / f
            if abs(v) >= 999.5 and f != _PREFIXES[0][0]:
                continue
            return f"{sig3(v)} {p}{unit}"
    f, p = _PREFIXES[-1]
    return f"{sig3(x / f)} {p}{unit}"


def fmt_ms(ms: Optional[float]) -> str:
    """A latency given in milliseconds: "193 ms", "4.41 ms", "812 µs", "1.23 s"."""
    if ms is None or not math.isfinite(ms):
        return "—"
    return fmt_si(ms * 1e-3, "s")
