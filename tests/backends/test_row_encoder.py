"""The row form (what is exported) against the eager packed path and the transformers model."""

from __future__ import annotations

import pytest

from ipcv_deploy.api import apply_ipcv
from ipcv_deploy.backends import RowEncoder, TorchBackend
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.models import load_model
from tests.conftest import TINY, TOWERS, hf_image_features
from tests.parity import assert_close, assert_same_indices


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("keep_ratio", [None, 1.0, 0.35])
def test_row_form_equals_transformers_with_and_without_ipcv(name, keep_ratio):
    loaded = load_model(name, seed=0)
    config = None
    if keep_ratio is not None:
        config = IPCVConfig(
            **{**loaded.adapter.reference_ipcv().to_dict(), "keep_ratio": keep_ratio}
        )
    encoder = RowEncoder(loaded, config)
    (pixels,) = encoder.inputs(3, seed=2)
    got = TorchBackend(encoder)(pixels)["image_embeds"]
    if config is not None:
        apply_ipcv(loaded.vision, config)
    assert_close(got, hf_image_features(loaded, pixels), what="row form vs transformers")
    if keep_ratio == 1.0:
        dense = TorchBackend(RowEncoder(loaded, None))(pixels)["image_embeds"]
        assert_close(got, dense, what="keep 1.0 vs dense")


@pytest.mark.parametrize("name", TOWERS)
def test_rows_equal_one_image_at_a_time(name):
    loaded = load_model(name, seed=0)
    backend = TorchBackend(RowEncoder(loaded, loaded.adapter.reference_ipcv(), return_indices=True))
    (pixels,) = backend.encoder.inputs(3, seed=1)
    batched = backend(pixels)
    for i in range(3):
        single = backend(pixels[i : i + 1])
        assert_close(batched["image_embeds"][i : i + 1], single["image_embeds"])
        assert_same_indices(batched["keep_idx"][i : i + 1], single["keep_idx"])


def test_tower_only_internvl_outputs_vision_features():
    loaded = load_model("internvit-300m", weights=False)
    assert loaded.model is None
    encoder = RowEncoder(loaded, None)
    assert encoder.output_kind == "vision_features" and encoder.projector is None


def test_dense_encoder_has_no_indices():
    with pytest.raises(ValueError, match="no kept indices"):
        RowEncoder(load_model("tiny-internvl", seed=0), None, return_indices=True)
