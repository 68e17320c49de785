"""``dupstudio calibrate cfg.json --text FILE --codes rtn|gptq --method stats|grid|adam|ap|e2e --out OUT``.

Stages: codes (round-to-nearest, or GPTQ on the quantized model's own inputs), the block-wise
method (scales, biases and gains over those codes; ``ap`` moves the codes too), then optionally ``--e2e-steps N`` of the
end-to-end KL stage over the whole model; ``--method e2e`` runs only that last stage on a
configuration as it stands.

Ctrl-C stops the run without leaving a half-written output; finished blocks are kept in
``OUT.partial/`` and a rerun with the same settings resumes there. ``--stream`` holds one
decoder block's weights at a time (picked by itself when the in-memory estimate does not fit)."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="tune replica parameters on text (block by block)",
                              description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--text", default=None, help="UTF-8 calibration text (default: the shipped excerpt "
                   "of WikiText-2 validation)")
    from dupstudio.core.calibration.settings import PRESET_HELP

    p.add_argument("--preset", default="fast", choices=list(PRESET_HELP),
                   help="; ".join(f"{k}: {v}" for k, v in PRESET_HELP.items()))
    add_settings_options(p)
    p.add_argument("--blocks", default=None, help="only these blocks, e.g. 0-3")
    p.add_argument("--model", default=None, help="model (default: the one the configuration names)")
    p.add_argument("--out", "-o", required=True)
    from dupstudio.commands._common import add_stream_flags

    add_stream_flags(p, "calibrate")
    p.set_defaults(func=run)


def add_settings_options(p) -> None:
    """One option per calibration setting, built from the settings' fields (their help lines,
    choices and flags: :func:`dupstudio.core.calibration.settings.settings_fields`). Each
    defaults to None: the preset's value."""
    from dupstudio.core.calibration.settings import settings_fields

    g = p.add_argument_group("calibration settings", "each one overrides the preset's value")
    for f in settings_fields():
        md = f.metadata
        opt = md.get("option", "--" + f.name.replace("_", "-"))
        if "const" in md:  # a flag: sets the field to ``const``
            text = md.get("option_help") or md["help"]
            g.add_argument(opt, dest=f.name, action="store_const", const=md["const"], default=None,
                           help=text.replace("%", "%%"))
            continue
        text = md.get("option_help") or md["help"] + _choices(md) + _default(f.name)
        kind = str if f.name == "e2e_seqs" else type(f.default)  # also 'all' (checked in run())
        g.add_argument(opt, dest=f.name, type=kind, default=None, help=text.replace("%", "%%"),
                       choices=list(md["choices"]) if "choices" in md else None)


def _choices(md) -> str:
    """". a: what a does; b: what b does" from a field's choices and their help."""
    if "choices" not in md:
        return ""
    helps = md.get("choice_help", {})
    return ". " + "; ".join(f"{c}: {helps[c]}" if c in helps else c for c in md["choices"])


def _default(name: str) -> str:
    """" (default 0.01)", or " (default: the preset's, 40 fast, 300 full)" when they differ."""
    from dupstudio.core.calibration.settings import PRESETS

    def show(v):
        return f"{v:g}" if isinstance(v, float) else str(v)

    values = [getattr(ps, name) for ps in PRESETS.values()]
    if len(set(values)) == 1:
        return f" (default {show(values[0])})"
    return " (default: the preset's, " + ", ".join(f"{show(v)} {p}" for v, p in zip(values, PRESETS)) + ")"


def run(args) -> int:
    from dupstudio.commands._common import (default_calibration_text, load_config_and_model,
                                            materialize)
    from dupstudio.commands.info import StderrProgress
    from dupstudio.core import config as C
    from dupstudio.core.calibrate import calibrate
    from dupstudio.core.calibration.settings import settings_fields, settings_from
    from dupstudio.core.calibration.data import calibration_tokens
    from dupstudio.core.evaluate import make_windows, read_text, text_sha256
    from dupstudio.core.jobs import DupstudioError

    e2e_seqs = args.e2e_seqs
    if e2e_seqs is not None and e2e_seqs != "all":
        try:
            e2e_seqs = int(e2e_seqs)
        except ValueError:
            raise DupstudioError(f"--e2e-seqs must be a whole number or 'all', got {e2e_seqs!r}") from None
        if e2e_seqs < 1:
            raise DupstudioError(f"--e2e-seqs must be at least 1 (or 'all'), got {e2e_seqs}")
    overrides = {f.name: getattr(args, f.name) for f in settings_fields()}
    overrides["e2e_seqs"] = 0 if e2e_seqs == "all" else e2e_seqs
    settings = settings_from(args.preset, **overrides)
    from dupstudio.core.streaming import (available_memory, estimate_calibration_memory,
                                          memory_line, pick_stream)

    cfg, loaded = load_config_and_model(args.config, args.model, lazy=True)
    text_path = Path(args.text) if args.text else default_calibration_text()
    text = read_text(text_path)
    # the block-wise pass takes the first ``seqs`` windows; the end-to-end stage may take more
    n_win = settings.seqs
    if settings.e2e_steps or settings.method == "e2e":
        n_win = None if not settings.e2e_seqs else max(settings.seqs, settings.e2e_seqs)  # None: all
    all_toks = calibration_tokens(loaded.tokenizer, text, settings.chat)
    toks = make_windows(all_toks, settings.seq_len, n_win, what=f"calibration text {text_path}"
                        + (" (framed as chat)" if settings.chat else ""))
    blocks = C.parse_layers(args.blocks, len(cfg.blocks)) if args.blocks else None
    est = estimate_calibration_memory(loaded.config, cfg, settings.seqs, settings.seq_len, settings,
                                      checkpoint=True)  # finished blocks are read back from OUT.partial
    avail = available_memory()
    stream = pick_stream(est["in_memory_bytes"], avail, args.stream)
    print(memory_line(est["in_memory_bytes"], est["streamed_bytes"], avail, stream), file=sys.stderr)
    if not stream:
        materialize(loaded)
    out = Path(args.out)
    ck = out.parent / (out.name + ".partial")
    progress = StderrProgress()
    t0 = time.perf_counter()
    try:
        new = calibrate(loaded, cfg, toks, settings, progress=progress, checkpoint_dir=ck, blocks=blocks,
                        stream=stream)
    except KeyboardInterrupt:
        progress.close()
        print(f"dupstudio: cancelled; finished blocks kept in {ck} (rerun to resume); "
              f"{out} not written", file=sys.stderr)
        return 130
    progress.close()
    new.provenance["calibration"]["text"] = str(text_path)
    new.provenance["calibration"]["text_sha256"] = text_sha256(text)
    new.provenance["calibration"]["tokens_in_text"] = int(len(all_toks))
    C.save(new, out)
    shutil.rmtree(ck, ignore_errors=True)
    acc = [b.calibration for b in new.blocks if b.calibration]
    better = sum(1 for a in acc if a["accepted"])
    print(f"calibrated {len(acc)} blocks ({better} improved) in {time.perf_counter() - t0:.1f}s; "
          f"wrote {out}", file=sys.stderr)
    return 0
