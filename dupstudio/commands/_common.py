"""Shared helpers of the CLI commands: open the model a configuration names, progress."""
from __future__ import annotations

from pathlib import Path

from dupstudio.commands.info import StderrProgress


def open_model_quiet(source, lazy: bool = False):
    from dupstudio.core.model_io import open_model

    progress = StderrProgress()
    try:
        return open_model(source, lazy=lazy, progress=progress)
    finally:
        progress.close()


def materialize(loaded) -> None:
    """Read every weight of a lazily opened model (the in-memory path)."""
    import mlx.core as mx

    from dupstudio.core.jobs import DupstudioError

    try:
        mx.eval(loaded.model.parameters())
    except Exception as e:
        raise DupstudioError(f"{loaded.path}: corrupt weight file ({type(e).__name__}: {e})") from e


def add_stream_flags(p, what: str) -> None:
    p.add_argument("--stream", dest="stream", action="store_true", default=None,
                   help=f"{what} one decoder block at a time with the weights read lazily (low "
                        "memory); default: stream only when the in-memory estimate exceeds the "
                        "available memory")
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="hold the whole model in memory")


def config_source(cfg) -> str | None:
    s = cfg.model.source
    return None if s in ("", "default", None) else s


def load_config_and_model(path, model_override=None, lazy: bool = False):
    """(config, loaded model). The model is --model, else the one the configuration names
    (``lazy``: weights not read yet; see :func:`materialize`)."""
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
                              (None if src in ("", "default", None) else src), lazy=lazy)
    cfg = C.load(p, model_shape(loaded.config))
    return cfg, loaded


def default_calibration_text() -> Path:
    from dupstudio.resources_path import resource

    return resource("calibration/wikitext2-valid-excerpt.txt")


def check_ranges(args, **limits) -> None:
    """Refuse option values outside their range before any work: ``name=(lo, hi, reason)``
    (``lo``/``hi`` None: unbounded). NaN and infinities are refused too. One-line errors that
    name the flag, the value and why."""
    import math

    from dupstudio.core.jobs import DupstudioError

    for name, (lo, hi, reason) in limits.items():
        v = getattr(args, name, None)
        if v is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(v, float) and not math.isfinite(v):
            raise DupstudioError(f"{flag} must be a finite number (got {v}): {reason}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            bound = (f"between {lo} and {hi}" if lo is not None and hi is not None
                     else f"at least {lo}" if lo is not None else f"at most {hi}")
            raise DupstudioError(f"{flag} must be {bound} (got {v}): {reason}")


def check_context(loaded, ctx: int, flag: str = "--ctx") -> None:
    """A window of ``ctx`` tokens must fit the model's positions (MLX fails hard beyond)."""
    from dupstudio.core.jobs import DupstudioError

    limit = loaded.config.get("max_position_embeddings")
    if isinstance(limit, int) and not isinstance(limit, bool) and ctx > limit:
        raise DupstudioError(f"{flag} {ctx} is longer than the model's context of {limit} tokens "
                             f"(max_position_embeddings in {loaded.path / 'config.json'})")
