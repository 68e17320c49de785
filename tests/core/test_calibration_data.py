"""Calibration text framed as chat exchanges in the model's own template."""
import numpy as np
import pytest

from dupstudio.core.calibration.data import MIN_PARAGRAPH, calibration_tokens, chat_exchanges, chat_tokens
from dupstudio.core.evaluate import tokenize
from dupstudio.core.jobs import DupstudioError

P1 = "The first sentence is short. " + "The rest of the first paragraph goes on for a while. " * 5
P2 = "Another paragraph starts here! " + "Its answer part is long enough to count as an answer. " * 5
TEXT = f" = A heading = \n\n {P1}\n short line. Not used.\n {P2}\n"


def test_paragraphs_become_exchanges_split_after_the_first_sentence():
    pairs = chat_exchanges(TEXT)
    assert pairs == [("The first sentence is short.", P1.strip()[len("The first sentence is short. "):]),
                     ("Another paragraph starts here!", P2.strip()[len("Another paragraph starts here! "):])]
    assert all(len(u) + len(a) + 1 >= MIN_PARAGRAPH for u, a in pairs)


def test_chat_tokens_are_the_templates_own_rendering_of_each_exchange(tiny_loaded):
    tok = tiny_loaded.tokenizer
    ids = chat_tokens(tok, TEXT)
    expect = []
    for u, a in chat_exchanges(TEXT):
        expect += tok.apply_chat_template([{"role": "user", "content": u}, {"role": "assistant", "content": a}],
                                          tokenize=True)
    assert ids.dtype == np.int32 and ids.tolist() == expect
    # more tokens than the plain paragraphs: the template's own turns are in the data
    plain = calibration_tokens(tok, TEXT, chat=False)
    assert np.array_equal(plain, tokenize(tok, TEXT))
    assert len(ids) > len(tokenize(tok, P1 + "\n" + P2))
    text = tok.decode(ids.tolist())
    assert "The first sentence is short." in text and "Another paragraph starts here!" in text


def test_chat_framing_refusals(tiny_loaded):
    with pytest.raises(DupstudioError, match="no paragraph"):
        chat_tokens(tiny_loaded.tokenizer, "too short.\n = heading only = \n")

    class Plain:  # a tokenizer without a chat template (a base model's)
        chat_template = None

    with pytest.raises(DupstudioError, match="no chat template"):
        calibration_tokens(Plain(), TEXT, chat=True)
