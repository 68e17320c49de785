"""Locate ``resources/`` (repository checkout, installed package data, or a frozen bundle)."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def resources_dir() -> Path:
    env = os.environ.get("DUPSTUDIO_RESOURCES")
    if env:
        return Path(env)
    candidates = []
    if getattr(sys, "frozen", False):
        candidates.append(Path(getattr(sys, "_MEIPASS", Path(sys.executable).parent)) / "resources")
    here = Path(__file__).resolve().parent
    candidates += [here.parent / "resources", here / "resources"]
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


def resource(rel: str) -> Path:
    return resources_dir() / rel
