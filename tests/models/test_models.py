"""Registry, presets, checkpoint loading, full-model generate, and bad input per family."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from ipcv_deploy import (
    ArtifactError,
    ConfigError,
    InputError,
    IPCVConfig,
    UnsupportedModelError,
    apply_ipcv,
    remove_ipcv,
)
from ipcv_deploy.compression import ipcv_encode
from ipcv_deploy.models import PRESETS, get_adapter, load_model, supported_model_types
from tests.conftest import TINY, make_tiny
from tests.parity import assert_close


def test_registry_lists_the_families():
    assert supported_model_types() == [
        "internvl",
        "llava",
        "llava_next",
        "paligemma",
        "qwen2_5_vl",
        "qwen2_vl",
    ]
    with pytest.raises(
        UnsupportedModelError,
        match=r"model_type 'idefics3' is not supported; supported: InternVL3 \(internvl\); "
        r"LLaVA-1.5 \(CLIP\) \(llava\); LLaVA-NeXT \(CLIP, anyres\) \(llava_next\); "
        r"PaliGemma \(SigLIP\) \(paligemma\); "
        r"Qwen2-VL \(qwen2_vl\); Qwen2.5-VL \(qwen2_5_vl\)",
    ):
        get_adapter("idefics3")


def test_apply_ipcv_refuses_unknown_modules():
    with pytest.raises(UnsupportedModelError, match="Linear is not a supported vision tower"):
        apply_ipcv(torch.nn.Linear(2, 2), IPCVConfig())


@pytest.mark.parametrize("name", TINY)
def test_prune_layer_must_fit_depth(name):
    tiny = make_tiny(name)
    depth = tiny.adapter.depth
    with pytest.raises(ConfigError, match=f"must be < the encoder depth {depth}, got {depth}"):
        apply_ipcv(tiny.loaded.vision, IPCVConfig(prune_layer=depth))


def test_wrong_image_sizes_are_refused():
    qwen = make_tiny("tiny-qwen2-vl")
    with pytest.raises(
        InputError,
        match=r"image size 450x448 does not fit Qwen2-VL.*multiples of patch x merge = 28",
    ):
        qwen.adapter.check_image_size((450, 448))
    intern = make_tiny("tiny-internvl")
    with pytest.raises(
        InputError, match=r"image size 224x224 does not fit InternVL3.*112x112 tiles"
    ):
        intern.adapter.check_image_size((224, 224))


def test_pixels_not_matching_grid_are_refused():
    qwen = make_tiny("tiny-qwen2-vl")
    apply_ipcv(qwen.loaded.vision)
    with pytest.raises(
        InputError, match=r"do not match grid_thw \[\[1, 16, 16\]\] \(expected 256 rows\)"
    ):
        qwen.loaded.vision(qwen.args[0][:100], grid_thw=qwen.kwargs["grid_thw"][:1])


def test_per_block_hidden_states_are_refused():
    qwen = make_tiny("tiny-qwen2-vl")
    apply_ipcv(qwen.loaded.vision)
    with pytest.raises(
        ConfigError, match="output_hidden_states=True asks for per-block hidden states"
    ):
        qwen.loaded.vision(*qwen.args, **qwen.kwargs, output_hidden_states=True)


def _prompt(name: str, tiny) -> dict:
    """input_ids with the right number of image placeholders (token 310) for the tiny presets."""
    if name.startswith("tiny-qwen"):
        per_image = 256 // 4
        ids = [1, 5] + ([312] + [310] * per_image + [313]) * 2 + [7, 8]
        return {
            "pixel_values": tiny.args[0],
            "image_grid_thw": tiny.kwargs["grid_thw"],
            "input_ids": torch.tensor([ids]),
        }
    config = tiny.loaded.model.config  # InternVL tiles, LLaVA / PaliGemma images
    per_image = getattr(config, "image_seq_length", None) or config.text_config.num_image_tokens
    ids = [1, 5] + [310] * per_image * 2 + [7, 8]
    return {"pixel_values": tiny.args[0], "input_ids": torch.tensor([ids])}


@pytest.mark.parametrize("name", TINY)
def test_full_model_generate_runs_unchanged(name):
    tiny = make_tiny(name)
    model = tiny.loaded.model
    inputs = _prompt(name, tiny)
    with torch.no_grad():
        dense = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        apply_ipcv(model, IPCVConfig(keep_ratio=1.0, prune_layer=3, as_layers=2))
        same = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        apply_ipcv(model)  # the family's reference settings
        compressed = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(same, dense)
    assert compressed.shape == dense.shape


@pytest.mark.parametrize("name", TINY)
def test_checkpoint_round_trip(tmp_path, name):
    tiny = make_tiny(name)
    tiny.loaded.model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.adapter is tiny.loaded.adapter
    adapter = loaded.adapter(loaded.vision)
    config = tiny.loaded.adapter.reference_ipcv()
    with torch.no_grad():
        want = tiny.adapter.features(
            ipcv_encode(tiny.adapter, config, *tiny.args, **tiny.kwargs).output
        )
        got = adapter.features(ipcv_encode(adapter, config, *tiny.args, **tiny.kwargs).output)
    assert_close(got, want)


def test_checkpoint_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(
        ArtifactError, match=r"has no .safetensors weights \(found: pytorch_model.bin\)"
    ):
        load_model(str(tmp_path))


def test_corrupt_checkpoint_is_refused(tmp_path):
    tiny = make_tiny("tiny-qwen2-vl")
    tiny.loaded.model.save_pretrained(tmp_path)
    weights = next(tmp_path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="could not load checkpoint"):
        load_model(str(tmp_path))


def test_unsupported_directories_are_refused(tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"has no config\.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl_chat"}))
    with pytest.raises(UnsupportedModelError, match=r"InternVL3-8B-hf"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    save_file({"w": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="model_type 'bert' is not supported"):
        load_model(str(tmp_path))
    with pytest.raises(UnsupportedModelError, match="not a built-in preset"):
        load_model("no-such-model")


def test_presets_build_on_meta_without_weights():
    for name, preset in PRESETS.items():
        loaded = load_model(name, weights=False)
        assert loaded.adapter.model_types[0] == preset.model_type
        assert next(loaded.vision.parameters()).device.type == "meta"


def test_remove_ipcv_restores_dense():
    tiny = make_tiny("tiny-qwen2-vl")
    dense = tiny.dense()
    apply_ipcv(tiny.loaded.vision)
    remove_ipcv(tiny.loaded.vision)
    assert not hasattr(tiny.loaded.vision, "ipcv_config")
    assert torch.equal(tiny.dense(), dense)


def test_llava_runs_only_the_blocks_up_to_its_feature_layer():
    tiny = make_tiny("tiny-llava")
    adapter = tiny.adapter
    assert adapter.depth == len(tiny.loaded.vision.encoder.layers) - 1  # vision_feature_layer -2
    apply_ipcv(tiny.loaded.model)
    with torch.no_grad():
        out = tiny.loaded.vision(tiny.args[0], output_hidden_states=-2)
    assert out.hidden_states[-2] is out.last_hidden_state
    assert all(h is None for i, h in enumerate(out.hidden_states) if i != adapter.depth)
    with pytest.raises(ConfigError, match="only has the feature layer's hidden states"):
        tiny.loaded.vision(tiny.args[0], output_hidden_states=True)


def test_llava_next_anyres_tiles_and_newlines():
    """Every anyres tile is an image to the tower; the packed features keep the image_newline
    rows where the dense model has them, and keep 1.0 equals dense through the packing."""
    loaded = load_model("tiny-llava-next", seed=0)
    model = loaded.model
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 5, 3, 112, 112, generator=gen)  # base image + up to 2x2 crops
    sizes = torch.tensor([[200, 220], [100, 210]])
    newline = model.model.image_newline
    with torch.no_grad():
        dense = model.model.get_image_features(pixels, sizes).pooler_output
        apply_ipcv(model, IPCVConfig(prune_layer=3, keep_ratio=1.0, as_layers=2))
        same = model.model.get_image_features(pixels, sizes).pooler_output
        apply_ipcv(model)
        compressed = model.model.get_image_features(pixels, sizes).pooler_output
    for d, s, c in zip(dense, same, compressed, strict=True):
        assert_close(s, d, what="keep 1.0 vs dense, packed anyres features")
        assert c.shape == d.shape
        rows = (d == newline).all(-1)
        assert rows.any() and torch.equal((c == newline).all(-1), rows)
    ids = [[1, 5, *[310] * dense[0].shape[0], 7], [1, 5, *[310] * dense[1].shape[0], 7]]
    width = max(map(len, ids))
    ids = torch.tensor([[0] * (width - len(i)) + i for i in ids])
    inputs = {"input_ids": ids, "pixel_values": pixels, "image_sizes": sizes}
    inputs["attention_mask"] = (ids != 0).long()
    remove_ipcv(model)
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        apply_ipcv(model, IPCVConfig(prune_layer=3, keep_ratio=1.0, as_layers=2))
        got = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)


def test_a_bare_clip_tower_behaves_like_the_dense_tower():
    """Outside LLaVA, a CLIPVisionModel runs every block: keep 1.0 equals the dense tower in
    last_hidden_state and pooler_output (inside LLaVA IPCV stops at vision_feature_layer)."""
    from transformers import CLIPVisionModel

    from ipcv_deploy.models.llava import tiny_config

    torch.manual_seed(0)
    tower = CLIPVisionModel(tiny_config().vision_config).eval()
    pixels = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = tower(pixels)
        apply_ipcv(tower, IPCVConfig(prune_layer=3, keep_ratio=1.0, as_layers=2))
        ours = tower(pixels)
        apply_ipcv(tower, IPCVConfig(prune_layer=3, keep_ratio=0.35, as_layers=2))
        pruned = tower(pixels)
    assert_close(ours.last_hidden_state, dense.last_hidden_state)
    assert_close(ours.pooler_output, dense.pooler_output)
    assert not torch.allclose(pruned.last_hidden_state, dense.last_hidden_state, atol=1e-3)


@pytest.mark.parametrize("layer", [-2, 0, "depth - 1", "depth"])
def test_internvl_takes_only_the_last_layer(layer):
    """hidden_states[i] is the output of block i - 1: any layer but -1 reads from inside the
    tower, where IPCV has pruned tokens."""
    loaded = load_model("tiny-internvl")
    depth = get_adapter("internvl")(loaded.vision).depth
    value = {"depth - 1": depth - 1, "depth": depth}.get(layer, layer)
    loaded.model.config.vision_feature_layer = value
    loaded.model.model.config.vision_feature_layer = value
    message = rf"vision_feature_layer={value} .*only the last"
    with pytest.raises(UnsupportedModelError, match=message):
        apply_ipcv(loaded.model)
