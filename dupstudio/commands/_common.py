"""Shared helpers of the CLI commands: open the model a configuration names, progress."""
from __future__ import annotations

from pathlib import Path

from dupstudio.commands.info import StderrProgress


def open_model_quiet(source):
    from dupstudio.core.model_io import open_model

    progress = StderrProgress()
    try:
        return open_model(source, progress=progress)
    finally:
        progress.close()


def config_source(cfg) -> str | None:
    s = cfg.model.source
    return None if s in ("", "default", None) else s


def load_config_and_model(path, model_override=None):
    """(config, loaded model). The model is --model, else the one the configuration names."""
    import json

    from dupstudio.core import config as C
    from dupstudio.core.jobs import DupstudioError
    from dupstudio.core.model_io import model_shape

    p = Path(path)
    if not p.is_file():
        raise DupstudioError(f"{p}: no such configuration file")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
        src = (raw.get("model") or {}).get("source") if isinstance(raw, dict) else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        src = None  # C.load reports the problem precisely
    if model_override is None and src is None:
        C.load(p)  # raises the precise error
    loaded = open_model_quiet(model_override if model_override is not None else
                              (None if src in ("", "default", None) else src))
    cfg = C.load(p, model_shape(loaded.config))
    return cfg, loaded


def default_calibration_text() -> Path:
    from dupstudio.resources_path import resource

    return resource("calibration/wikitext2-valid-excerpt.txt")
