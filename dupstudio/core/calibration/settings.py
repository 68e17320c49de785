"""What a calibration run is asked to do: its settings, the presets and the method names.

Plain data, no computation: the command line, the app and the other core modules read the names
and help texts here, and :func:`settings_from` checks a combination before a run starts.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

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


@dataclass
class CalibSettings:
    method: str = "adam"
    steps: int = 100
    lr: float = 5e-3
    batch: int = 8
    seqs: int = 64
    seq_len: int = 512
    init: str = "closed_form"  # or "rtn"
    incremental: bool = True
    gains: bool = False  # per-row and tied per-column gains
    residual_gain: bool = False  # tune β even for K = 1
    holdout: float = 0.25  # share of sequences held out to pick the best step and guard
    reg: float = 0.0  # L2 pull of the tuned offsets (u, d, gains) towards the start, per value
    seed: int = 0
    codes: str = "rtn"  # one of CODE_METHODS
    gptq_damp: float = 0.01  # GPTQ dampening, a share of the Hessian's mean diagonal
    gptq_act_order: bool = False  # GPTQ: quantize columns in order of decreasing Hessian diagonal
    e2e_steps: int = 0  # end-to-end KL steps over all blocks after the block-wise pass (0: none)
    e2e_lr: float = 1e-3
    e2e_seqs: int = 0  # sequences the end-to-end stage draws from (0: all it is given)
    ap_lr: float = 1.5e-3  # learned rounding: Adam's step on the latent codes, in code units per step

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


PRESETS = {
    # ≤ 10 min for the default model on 2 CPU cores (a preset a user can wait for)
    "fast": CalibSettings(method="adam", steps=40, lr=3e-3, batch=4, seqs=32, seq_len=256,
                          init="closed_form", reg=1.0, ap_lr=1.5e-3),
    # the reference recipe's data and batch, with a closed-form start
    "full": CalibSettings(method="adam", steps=300, batch=8, seqs=64, seq_len=512, init="closed_form",
                          holdout=0.0, reg=1.0, ap_lr=5e-4),
}


#: one line per preset for the CLI and the GUI
PRESET_HELP = {
    "fast": "≤ 10 min on 2 CPU cores for the default model (8,192 tokens, 40 steps per block)",
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

