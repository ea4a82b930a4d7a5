import pytest

from sdlora.base.models import load_base
from sdlora.errors import SdloraError


def test_family_and_prediction_type_come_from_the_model(tiny_sd1, tiny_sdxl, tiny_sd1_v):
    assert load_base(str(tiny_sd1)).family.name == "sd1"
    sdxl = load_base(str(tiny_sdxl))
    assert sdxl.family.name == "sdxl"
    assert len(sdxl.text_encoders) == 2
    assert load_base(str(tiny_sd1)).prediction_type == "epsilon"
    assert load_base(str(tiny_sd1_v)).prediction_type == "v_prediction"


def test_missing_base_is_a_clear_error(tmp_path):
    with pytest.raises(SdloraError, match="not found"):
        load_base(str(tmp_path / "no-such-model"))


def test_folder_without_model_index_is_a_clear_error(tmp_path):
    with pytest.raises(SdloraError, match="model_index.json"):
        load_base(str(tmp_path))


def test_pickle_checkpoint_is_refused_without_loading(tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not even a pickle")
    with pytest.raises(SdloraError, match="never unpickles"):
        load_base(str(checkpoint))


def test_unreachable_hub_id_is_a_clear_error():
    with pytest.raises(SdloraError, match="cannot load base"):
        load_base("someone/not-a-real-model-xyz")
