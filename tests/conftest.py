import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory):
    """Tests never touch the user's cache: DUPSTUDIO_HOME points at a session folder, except
    the converted default model, which tests share through DUPSTUDIO_TEST_HOME if set."""
    home = os.environ.get("DUPSTUDIO_TEST_HOME") or str(tmp_path_factory.mktemp("dupstudio-home"))
    old = os.environ.get("DUPSTUDIO_HOME")
    os.environ["DUPSTUDIO_HOME"] = home
    yield home
    if old is None:
        os.environ.pop("DUPSTUDIO_HOME", None)
    else:
        os.environ["DUPSTUDIO_HOME"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from dupstudio.core.testing import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    from dupstudio.core.model_io import open_model

    return open_model(tiny_model_dir)


@pytest.fixture(scope="session")
def default_loaded():
    """The converted default model (SmolLM2-135M-Instruct), float32. Slow tests only."""
    from dupstudio.core.model_io import open_model

    try:
        return open_model(None)
    except Exception as e:  # pragma: no cover - environment without the wheel
        pytest.skip(f"default model unavailable: {e}")
