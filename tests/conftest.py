import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from sdlora.base.tiny import build_tiny_pipeline, save_tiny_pipeline  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests run tiny models: one thread is faster, and does not oversubscribe a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    """Path of a tiny SD1 diffusers folder (random weights, real architecture and tokenizer)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd1"), "sd1")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """Path of a tiny SDXL diffusers folder."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sdxl"), "sdxl")


@pytest.fixture(scope="session")
def tiny_sd1_v(tmp_path_factory):
    """Tiny SD1 architecture with a v-prediction scheduler (stands in for SD 2.x 768-v)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd1-v"), "sd1", prediction_type="v_prediction")


@pytest.fixture(scope="module")
def sd1():
    """A tiny SD1 pipeline in memory, one per test module (tests may change it)."""
    return build_tiny_pipeline("sd1")


@pytest.fixture(scope="module")
def pristine_sd1():
    """A tiny SD1 pipeline that tests copy before changing (building one takes seconds)."""
    return build_tiny_pipeline("sd1")


@pytest.fixture(scope="module")
def sdxl():
    """A tiny SDXL pipeline in memory, one per test module."""
    return build_tiny_pipeline("sdxl")


@pytest.fixture()
def without_bitsandbytes(monkeypatch):
    """Imports of bitsandbytes fail, as on a machine without it."""
    import builtins

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
