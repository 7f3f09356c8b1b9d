"""The presets' locally built tokenizer and processors."""

from __future__ import annotations

import pytest

from ipcv_deploy.errors import UnsupportedModelError
from ipcv_deploy.models import load_model
from ipcv_deploy.models.processors import IMAGE_ID, load_processor, tiny_tokenizer
from ipcv_deploy.runtime.testcard import make_test_card


@pytest.mark.parametrize("model_type", ["qwen2_vl", "internvl", "llava"])
def test_tiny_tokenizer_is_lossless_and_fits_the_tiny_llm(model_type: str) -> None:
    tokenizer = tiny_tokenizer(model_type)
    assert len(tokenizer) == 320
    text = "Ünïcode, 数字 42 and\nnewlines!"
    ids = tokenizer(text)["input_ids"]
    assert max(ids) < 259 and tokenizer.decode(ids) == text
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id == 0


@pytest.mark.parametrize(
    ("name", "tokens"),
    [("tiny-qwen2-vl", 64), ("tiny-qwen2.5-vl", 64), ("tiny-internvl", 16), ("tiny-llava", 64)],
)
def test_preset_processor_expands_one_image_to_the_models_tokens(name: str, tokens: int) -> None:
    loaded = load_model(name)
    processor = load_processor(loaded, loaded.image_size)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.count(processor.image_token) == 1
    h, w = loaded.image_size
    batch = processor(text=[prompt], images=[make_test_card().resize((w, h))], return_tensors="pt")
    assert int((batch["input_ids"] == IMAGE_ID).sum()) == tokens


def test_processor_for_a_family_without_runtime_support() -> None:
    loaded = load_model("tiny-paligemma")
    with pytest.raises(UnsupportedModelError, match="does not support model_type 'paligemma'"):
        load_processor(loaded, loaded.image_size)
