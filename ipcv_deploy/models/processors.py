"""Each family's transformers processor: loaded from a checkpoint, or built for the presets.

Checkpoints bring their own processor (``AutoProcessor.from_pretrained`` on the directory).
The built-in presets get the same processor classes built in code around a byte-level
tokenizer made locally (320 ids, the tiny LLMs' vocabulary), so ``run`` needs no download.
``fit_processor`` makes any of them produce exactly one tile of the encoder's static size;
``image_rows`` turns the processor's ``pixel_values`` into the encoders' row form.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders
from tokenizers import models as token_models
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    AutoProcessor,
    InternVLProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ipcv_deploy.errors import ArtifactError, UnsupportedModelError
from ipcv_deploy.models.base import ImageSize
from ipcv_deploy.models.presets import PRESETS, LoadedModel

__all__ = ["fit_processor", "image_rows", "load_processor", "preset_processor", "tiny_tokenizer"]

#: Ids of the tiny tokenizer: special tokens, then the 256 byte symbols, then named tokens.
PAD, BOS, EOS = 0, 1, 2
FIRST_BYTE = 3
VOCAB_SIZE = 320
IMAGE_ID = 310  # ``image_token_id`` of every tiny config

_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
    "{% if c.type == 'image' %}IMAGE{% else %}{{ c.text }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_VICUNA = (
    "{% for m in messages %}{{ m.role.upper() }}: "
    "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
    "{% if c.type == 'image' %}IMAGE\n{% else %}{{ c.text }}{% endif %}{% endfor %}{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class _Family:
    """How one family's preset processor is put together."""

    #: Named tokens of the tokenizer (id -> text), the image placeholder at ``IMAGE_ID``.
    tokens: dict[int, str]
    #: Tokenizer attributes the processor reads (name -> token text).
    attributes: dict[str, str]
    #: Chat template; ``IMAGE`` marks where the image goes.
    template: str
    #: What stands for an image in the template.
    image_text: str


_QWEN = _Family(
    {310: "<|image_pad|>", 311: "<|video_pad|>", 312: "<|vision_start|>", 313: "<|vision_end|>"},
    {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    _CHATML,
    "<|vision_start|><|image_pad|><|vision_end|>",
)
_FAMILIES: dict[str, _Family] = {
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "internvl": _Family(
        {310: "<IMG_CONTEXT>", 311: "<video>", 314: "<img>", 315: "</img>"},
        {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        _CHATML,
        "<IMG_CONTEXT>\n",
    ),
    "llava": _Family({310: "<image>"}, {"image_token": "<image>"}, _VICUNA, "<image>"),
}


def _family(model_type: str) -> _Family:
    try:
        return _FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"`run` does not support model_type {model_type!r} yet; supported: "
            f"{', '.join(sorted(_FAMILIES))}"
        ) from None


def tiny_tokenizer(model_type: str) -> PreTrainedTokenizerFast:
    """The presets' tokenizer: bytes (lossless for any UTF-8 text), ChatML and image tokens.

    Ids: 0 ``<pad>``, 1 ``<s>``, 2 ``</s>``, 3..258 the byte symbols, 300/301 ``<|im_start|>`` /
    ``<|im_end|>``, the family's image tokens at 310.., reserved tokens up to 319. Left padding.
    """
    family = _family(model_type)
    named = {300: "<|im_start|>", 301: "<|im_end|>", **family.tokens}
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS}
    vocab.update({s: FIRST_BYTE + i for i, s in enumerate(sorted(ByteLevel.alphabet()))})
    specials = [named.get(i, f"<|reserved_{i}|>") for i in range(FIRST_BYTE + 256, VOCAB_SIZE)]
    vocab.update({token: FIRST_BYTE + 256 + i for i, token in enumerate(specials)})
    backend = Tokenizer(token_models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ["<pad>", "<s>", "</s>", *specials]]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens=family.attributes,
    )


def preset_processor(loaded: LoadedModel) -> Any:
    """The family's processor around ``tiny_tokenizer``, configured from the model's config."""
    model_type = loaded.adapter.model_types[0]
    family = _family(model_type)
    tokenizer = tiny_tokenizer(model_type)
    template = family.template.replace("IMAGE", family.image_text)
    config = loaded.model.config
    vision = config.vision_config
    h, w = loaded.image_size
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size,
        )
        cls = Qwen2VLProcessor if model_type == "qwen2_vl" else Qwen2_5_VLProcessor
        return _images_only(cls)(image_processor, tokenizer, None, chat_template=template)
    if model_type == "internvl":
        return _images_only(InternVLProcessor)(
            GotOcr2ImageProcessorPil(size={"height": h, "width": w}, crop_to_patches=False),
            tokenizer,
            None,
            image_seq_length=config.image_seq_length,
            chat_template=template,
        )
    return LlavaProcessor(
        CLIPImageProcessorPil(size={"shortest_edge": h}, crop_size={"height": h, "width": w}),
        tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=template,
    )


def _images_only(cls: type) -> type:
    """``cls`` accepting no video processor (those need torchvision, which images do not)."""

    class ImagesOnly(cls):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument is None and "video" in argument_name:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = cls.__name__
    return ImagesOnly


def load_processor(loaded: LoadedModel, image_size: ImageSize) -> Any:
    """The model's processor (checkpoint directory or preset), fitted to ``image_size``.

    Raises:
        ArtifactError: a checkpoint directory whose processor files do not load.
    """
    model_type = loaded.adapter.model_types[0]
    _family(model_type)
    if loaded.name in PRESETS:
        processor = preset_processor(loaded)
    else:
        try:
            processor = AutoProcessor.from_pretrained(Path(loaded.name))
        except (OSError, ValueError, TypeError, AttributeError, ImportError) as err:
            raise ArtifactError(
                f"could not load the processor of {loaded.name}: "
                f"{str(err).splitlines()[0]}; the directory needs the processor and tokenizer "
                "files saved with the model, and transformers' Qwen / InternVL processors need "
                "torchvision for their video part (pip install the torchvision matching torch)"
            ) from None
    return fit_processor(processor, model_type, image_size)


def fit_processor(processor: Any, model_type: str, image_size: ImageSize) -> Any:
    """Make ``processor`` turn an image already resized to ``image_size`` into one tile of it.

    The runtime resizes every image to the encoder's static (H, W) first; this keeps the
    processor from resizing, tiling or cropping it again. Returns ``processor``.
    """
    h, w = image_size
    images = processor.image_processor
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        images.size = {"shortest_edge": h * w, "longest_edge": h * w}
    elif model_type == "internvl":
        images.size = {"height": h, "width": w}
        images.crop_to_patches = False
    elif model_type == "llava":
        images.size = {"shortest_edge": min(h, w)}
        images.crop_size = {"height": h, "width": w}
    else:
        _family(model_type)
    return processor


def image_rows(model_type: str, pixel_values: torch.Tensor, batch: int) -> torch.Tensor:
    """The processor's ``pixel_values`` for ``batch`` one-image prompts, in row form [B, ...].

    Qwen-style processors flatten every image's patches into [B * n, C * t * p * p]; the row
    form is [B, n, C * t * p * p]. Tiles [B, C, H, W] are rows already.
    """
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        return pixel_values.reshape(batch, -1, pixel_values.shape[-1])
    return pixel_values
