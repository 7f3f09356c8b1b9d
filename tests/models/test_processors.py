"""The presets' locally built tokenizer and processors."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from PIL import Image

from ipcv_deploy.backends import RowEncoder
from ipcv_deploy.errors import ConfigError, UnsupportedModelError
from ipcv_deploy.models import LoadedModel, load_model
from ipcv_deploy.models.processors import (
    IMAGE_ID,
    fit_processor,
    image_rows,
    load_processor,
    placeholder,
    preset_processor,
    tiny_tokenizer,
)
from ipcv_deploy.runtime.testcard import make_test_card

MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
#: preset, placeholder tokens per image
FAMILIES = [
    ("tiny-qwen2-vl", 64),
    ("tiny-qwen2.5-vl", 64),
    ("tiny-internvl", 16),
    ("tiny-llava", 64),
]


@cache
def _loaded(name: str) -> LoadedModel:
    return load_model(name)


def _images() -> list[Image.Image]:
    """Two images of other sizes and aspect ratios than the encoders'."""
    return [make_test_card(200, 300), make_test_card(90, 64)]


def _model_features(loaded: LoadedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense model's own image embeddings of the processor's pixels, [images, n, H]."""
    model, config = loaded.model, loaded.model.config
    with torch.no_grad():
        if "image_grid_thw" in batch:
            out = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        elif not hasattr(config, "vision_feature_layer"):  # PaliGemma: the last layer
            out = model.model.get_image_features(batch["pixel_values"])
        else:
            out = model.model.get_image_features(
                pixel_values=batch["pixel_values"],
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            )
    features = out.pooler_output
    if isinstance(features, (list, tuple)):
        features = torch.cat(list(features))
    return features.reshape(len(batch["input_ids"]), -1, features.shape[-1])


@pytest.mark.parametrize(
    "model_type", [None, "qwen2_vl", "qwen2_5_vl", "internvl", "llava", "llava_next", "paligemma"]
)
def test_tiny_tokenizer_is_lossless_and_fits_the_tiny_llm(model_type: str | None) -> None:
    tokenizer = tiny_tokenizer() if model_type is None else tiny_tokenizer(model_type)
    assert len(tokenizer) == 320
    text = "Ünïcode, 数字 42 and\nnewlines!  <b>"
    ids = tokenizer(text)["input_ids"]
    assert max(ids) < 259 and tokenizer.decode(ids) == text
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id == 0
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    named = ["<|im_start|>", "<|im_end|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    assert tokenizer.convert_tokens_to_ids(named) == [300, 301, 311, 312, 313]
    assert tokenizer.convert_tokens_to_ids(["<img>", "</img>"]) == [314, 315]
    image = placeholder(model_type or "qwen2_vl")
    assert tokenizer.convert_tokens_to_ids(image) == IMAGE_ID
    assert tokenizer(f"a{image}{image}b")["input_ids"][1:3] == [IMAGE_ID, IMAGE_ID]


@pytest.mark.parametrize(("name", "tokens"), FAMILIES)
def test_preset_processor_gives_the_models_image_tokens_and_pixels(name: str, tokens: int) -> None:
    loaded = _loaded(name)
    model_type = loaded.adapter.model_types[0]
    processor = load_processor(loaded, loaded.image_size)
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert processor.image_token == placeholder(model_type)
    assert prompt.count(processor.image_token) == 1
    batch = processor(
        text=[prompt, "longer " + prompt], images=_images(), return_tensors="pt", padding=True
    )
    assert (batch["input_ids"] == IMAGE_ID).sum(1).tolist() == [tokens, tokens]
    h, w = loaded.image_size
    pixels = batch["pixel_values"]
    if model_type.startswith("qwen"):
        patch = loaded.model.config.vision_config.patch_size
        assert batch["image_grid_thw"].tolist() == [[1, h // patch, w // patch]] * 2
        assert pixels.shape[0] == 2 * (h // patch) * (w // patch)
    else:
        assert tuple(pixels.shape) == (2, 3, h, w)

    rows = image_rows(model_type, pixels, [1, 1])
    with torch.no_grad():
        (embeds,) = RowEncoder(loaded, None)(rows)
    assert embeds.shape[:2] == (2, tokens)
    torch.testing.assert_close(embeds, _model_features(loaded, batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", [name for name, _ in FAMILIES])
def test_dense_model_generates_from_the_processor_batch(name: str) -> None:
    loaded = _loaded(name)
    processor = load_processor(loaded, loaded.image_size)
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    batch = processor(
        text=[prompt, "a longer " + prompt], images=_images(), return_tensors="pt", padding=True
    )
    assert batch["input_ids"][0, 0] == 0  # left padding
    with torch.no_grad():
        out = loaded.model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)


def test_fit_processor_resizes_qwen_images_to_a_new_size_exactly() -> None:
    loaded = _loaded("tiny-qwen2-vl")
    processor = load_processor(loaded, loaded.image_size)
    processor = fit_processor(processor, "qwen2_vl", (112, 168))
    assert fit_processor(processor, "qwen2_vl", (112, 168)) is processor
    batch = processor(text=[processor.image_token] * 2, images=_images(), return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 8, 12]] * 2
    assert (batch["input_ids"] == IMAGE_ID).sum(1).tolist() == [24, 24]
    assert image_rows("qwen2_vl", batch["pixel_values"], [1, 1]).shape == (2, 96, 1176)


def test_paligemma_processor_writes_its_prefix() -> None:
    """PaliGemma has no chat template: image tokens, BOS, the task, a newline; the whole
    prefix is token type 0 (attended both ways), and its pixels give the model's features."""
    loaded = _loaded("tiny-paligemma")
    processor = load_processor(loaded, loaded.image_size)
    assert processor.chat_template is None
    batch = processor(
        text=["<image>caption en", "<image>a longer task"],
        images=_images(),
        return_tensors="pt",
        padding=True,
    )
    ids, types = batch["input_ids"], batch["token_type_ids"]
    assert (ids == IMAGE_ID).sum(1).tolist() == [64, 64]
    assert processor.decode(ids[1, 64:]) == "<s>a longer task\n"
    assert not types.any()  # no suffix: all prefix
    rows = image_rows("paligemma", batch["pixel_values"], [1, 1])
    with torch.no_grad():
        (embeds,) = RowEncoder(loaded, None)(rows)
    torch.testing.assert_close(embeds, _model_features(loaded, batch), rtol=0, atol=1e-5)


def test_llava_next_is_never_fitted_to_one_size() -> None:
    """Its LLM packs anyres tiles: one fixed-size image would be a silent mismatch."""
    loaded = _loaded("tiny-llava-next")
    processor = load_processor(loaded, None)
    with pytest.raises(ConfigError, match="drop --image-size"):
        fit_processor(processor, "llava_next", (112, 112))


def test_processor_for_a_family_without_runtime_support() -> None:
    with pytest.raises(UnsupportedModelError, match="does not support model_type 'mllama'"):
        tiny_tokenizer("mllama")
    config = _loaded("tiny-llava").model.config
    with pytest.raises(UnsupportedModelError, match="supported: internvl, llava, llava_next"):
        preset_processor("mllama", config, (112, 112))
