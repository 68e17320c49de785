"""Calibration text → token windows, plain or framed as chat exchanges.

A chat model is deployed on its chat template; calibrated on plain prose only, a 2-bit model can
keep the prose and lose what happens where an answer starts (the exported default model answered
every chat prompt with newlines). Framing the same text as chat exchanges in the model's own
template puts those positions into the calibration data without any other text.
"""
from __future__ import annotations

import re

import numpy as np

from dupstudio.core.jobs import DupstudioError

#: a paragraph used as a chat exchange: at least this long, and not a heading ("= Title =")
MIN_PARAGRAPH = 200


def chat_exchanges(text: str) -> list:
    """(user, assistant) pairs: each paragraph (one line of at least ``MIN_PARAGRAPH`` characters,
    not a heading) split after its first sentence."""
    out = []
    for line in text.split("\n"):
        p = line.strip()
        if len(p) < MIN_PARAGRAPH or p.startswith("="):
            continue
        parts = re.split(r"(?<=[.!?])\s+", p, maxsplit=1)
        if len(parts) == 2 and parts[1]:
            out.append((parts[0], parts[1]))
    return out


def chat_tokens(tokenizer, text: str) -> np.ndarray:
    """The text's exchanges in the tokenizer's chat template, one after another (int32)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DupstudioError("this model's tokenizer has no chat template, so the text cannot be framed "
                             "as chat; calibrate on the plain text")
    pairs = chat_exchanges(text)
    if not pairs:
        raise DupstudioError(f"the calibration text has no paragraph of {MIN_PARAGRAPH}+ characters with "
                             "two sentences to frame as a chat exchange")
    ids = []
    for user, assistant in pairs:
        ids.extend(tokenizer.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], tokenize=True))
    return np.asarray(ids, dtype=np.int32)


def calibration_tokens(tokenizer, text: str, chat: bool = False) -> np.ndarray:
    """The calibration text's tokens: plain, or framed as chat exchanges."""
    from dupstudio.core.evaluate import tokenize

    return chat_tokens(tokenizer, text) if chat else tokenize(tokenizer, text)
