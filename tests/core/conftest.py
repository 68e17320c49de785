"""Fixtures shared by the core tests: the tiny model's shape and a few calibration windows."""
import pytest


@pytest.fixture(scope="module")
def shape(tiny_loaded):
    from dupstudio.core.model_io import model_shape

    return model_shape(tiny_loaded.config)


@pytest.fixture(scope="module")
def cal(tiny_loaded):
    """8 windows of 32 tokens of the synthetic text."""
    from dupstudio.core.evaluate import make_windows, tokenize
    from dupstudio.core.testing import tiny_text

    return make_windows(tokenize(tiny_loaded.tokenizer, tiny_text(20000)), 32, 8)
