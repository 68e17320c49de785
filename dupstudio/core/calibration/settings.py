"""What a calibration run is asked to do: its settings, the presets and the method names.

Plain data, no computation: the command line, the app and the other core modules read the names
and help texts here, and :func:`settings_from` checks a combination before a run starts.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace

from dupstudio.core.jobs import DupstudioError

#: block-wise methods, and "e2e": no block-wise pass, only the end-to-end stage on the
#: configuration as it stands. "ap" is "adam" with learned rounding: each weight's code is the
#: rounding of a trainable latent value (straight-through gradient), trained together with the
#: scales and biases to match the full-precision block output, then frozen.
METHODS = ("stats", "grid", "adam", "ap", "e2e")
#: one line per method for the CLI and the GUI
METHOD_HELP = {"adam": "closed-form start, then Adam steps on the block-output loss (codes fixed)",
               "ap": "learned rounding: Adam on the block-output loss moves the codes too, then freezes them",
               "stats": "closed forms from activation statistics (fast, no steps)",
               "grid": "grid search over replica γ, offset and α",
               "e2e": "no block-wise pass: only the end-to-end KL stage on the configuration as it stands"}
#: how a block's integer codes are chosen before its scales are tuned: round-to-nearest from the
#: primary replica's strategy, or GPTQ (error feedback through the layer's input Hessian, with the
#: inputs the already-quantized earlier blocks produce)
CODE_METHODS = ("rtn", "gptq")
#: one line per code choice for the CLI and the GUI
CODE_METHOD_HELP = {"rtn": "round-to-nearest codes, only scales tuned",
                    "gptq": "GPTQ chooses the codes with error feedback through each layer's input "
                            "Hessian, measured on the quantized model's own inputs"}
#: how a block's scales and biases start
INIT_HELP = {"closed_form": "least squares weighted by each layer's inputs",
             "rtn": "round-to-nearest's own"}


def _field(default, help: str, **more):
    """A settings field with its help line and, in ``more``: ``choices`` (the values allowed)
    with ``choice_help`` (value -> one line), ``option`` (the command line's name when not
    ``--field-name``), ``const`` (the value the option sets: a flag) and ``option_help`` (the
    option's whole help when it reads otherwise than the field's)."""
    return field(default=default, metadata={"help": help, **more})


@dataclass
class CalibSettings:
    """One calibration run's settings. Every field carries its help line in its metadata
    (:func:`settings_fields`): the command line's options and the app's tooltips are built from
    it."""

    method: str = _field("adam", "block-wise method", choices=METHODS, choice_help=METHOD_HELP)
    steps: int = _field(100, "Adam steps per block")
    lr: float = _field(5e-3, "Adam's learning rate for the scales, biases and gains")
    batch: int = _field(8, "sequences per Adam step and per forward pass")
    seqs: int = _field(64, "calibration sequences of the block-wise pass")
    seq_len: int = _field(512, "tokens per calibration sequence")
    init: str = _field("closed_form", "where the scales and biases start", choices=tuple(INIT_HELP),
                       choice_help=INIT_HELP)
    incremental: bool = _field(True, "feed each block the quantized model's output of the blocks before it "
                               "(off: the full-precision inputs)", option="--no-incremental", const=False,
                               option_help="feed blocks the full-precision inputs instead of the quantized model's")
    gains: bool = _field(False, "also tune per-row and per-column gains", const=True)
    residual_gain: bool = _field(False, "also tune each block's residual gain β (even for K = 1)", const=True)
    holdout: float = _field(0.25, "share of the sequences held out to pick the best Adam step and for the "
                            "never-worse guard")
    reg: float = _field(0.0, "L2 pull of the tuned offsets (scales, biases, gains) towards their start, "
                        "per value")
    seed: int = _field(0, "random seed (batches and held-out sequences)")
    codes: str = _field("rtn", "how each block's integer codes are chosen before its scales are tuned",
                        choices=CODE_METHODS, choice_help=CODE_METHOD_HELP)
    gptq_damp: float = _field(0.01, "GPTQ dampening, a share of the Hessian's mean diagonal")
    gptq_act_order: bool = _field(False, "GPTQ: visit columns in order of decreasing input energy",
                                  option="--act-order", const=True)
    e2e_steps: int = _field(0, "end-to-end KL steps over all blocks after the block-wise pass; 0: none")
    e2e_lr: float = _field(1e-3, "end-to-end learning rate")
    e2e_seqs: int = _field(0, "sequences of the text the end-to-end stage draws from; 0: all",
                           option_help="sequences of the text for the end-to-end stage, or 'all' "
                                       "(default: the preset's)")
    chat: bool = _field(False, "frame the calibration text as chat exchanges in the model's own chat "
                        "template (user: a paragraph's first sentence; assistant: the rest), so the quantized "
                        "model also learns the positions where a chat model starts its answers", const=True)
    ap_lr: float = _field(1.5e-3, "learned rounding (method ap): Adam's step on the latent codes, in code "
                          "units")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


PRESETS = {
    # ≤ 10 min for the default model on 2 CPU cores (a preset a user can wait for)
    # learned rounding: on the default model 143 against 213 (scales only) on WikiText-2 test, equal
    # on Python source (376 against 380), for about a seventh more time per block
    "fast": CalibSettings(method="ap", steps=40, lr=3e-3, batch=4, seqs=32, seq_len=256,
                          init="closed_form", reg=1.0, ap_lr=1.5e-3),
    # the reference recipe's data and batch, with a closed-form start
    "full": CalibSettings(method="adam", steps=300, batch=8, seqs=64, seq_len=512, init="closed_form",
                          holdout=0.0, reg=1.0, ap_lr=5e-4),
}


#: one line per preset for the CLI and the GUI
PRESET_HELP = {
    "fast": "about 10 min on 2 CPU cores for the default model (8,192 tokens, 40 steps per block, "
            "learned rounding)",
    "full": "the reference recipe (64×512 tokens, 300 steps per block); an accelerator's work",
}


def settings_from(preset: str = "fast", **overrides) -> CalibSettings:
    if preset not in PRESETS:
        raise DupstudioError(f"unknown preset {preset!r} (use {', '.join(PRESETS)})")
    s = replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    if s.method not in METHODS:
        raise DupstudioError(f"unknown calibration method {s.method!r} (use {', '.join(METHODS)})")
    if s.codes not in CODE_METHODS:
        raise DupstudioError(f"unknown code choice {s.codes!r} (use {', '.join(CODE_METHODS)})")
    if not (0.0 <= s.gptq_damp <= 10.0) or s.e2e_steps < 0 or s.e2e_seqs < 0 or not (0.0 < s.e2e_lr < 1.0):
        raise DupstudioError("calibration settings out of range (0 ≤ GPTQ dampening ≤ 10, "
                             "end-to-end steps ≥ 0, 0 < end-to-end learning rate < 1)")
    if not (0.0 < s.ap_lr < 1.0):
        raise DupstudioError(f"the learned-rounding step must be in (0, 1) code units (got {s.ap_lr})")
    if s.steps < 0 or s.batch < 1 or s.seqs < 1 or s.seq_len < 16:
        raise DupstudioError("calibration settings out of range (steps ≥ 0, batch ≥ 1, seqs ≥ 1, seq_len ≥ 16)")
    return s



def settings_fields() -> tuple:
    """:class:`CalibSettings`' fields (``dataclasses.Field``), in order; each one's ``metadata``
    holds its help line (see :func:`_field`)."""
    return fields(CalibSettings)


def setting_help(name: str) -> str:
    """Field ``name``'s help line."""
    return next(f for f in fields(CalibSettings) if f.name == name).metadata["help"]
