"""Each family's transformers processor: loaded from a checkpoint, or built for the presets.

Checkpoints bring their own processor (``AutoProcessor.from_pretrained`` on the directory).
The built-in presets get the same processor classes built in code around a byte-level
tokenizer made locally (320 ids, the tiny LLMs' vocabulary), so ``run`` needs no download.
``fit_processor`` makes any of them turn every image into exactly one tile of the encoder's
static size, ``tile_processor`` keeps the model's own tiling; ``image_rows`` turns the
processor's ``pixel_values`` into the encoders' row form.
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
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    InternVLProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
    PaliGemmaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.utils import is_torchvision_available

from ipcv_deploy.errors import (
    ArtifactError,
    BackendUnavailableError,
    ConfigError,
    UnsupportedModelError,
)
from ipcv_deploy.hf_compat import exact_size_image_processor, images_only_processor
from ipcv_deploy.models.base import ImageSize
from ipcv_deploy.models.presets import PRESETS, LoadedModel

__all__ = [
    "IMAGE_ID",
    "fit_processor",
    "image_rows",
    "load_processor",
    "native_processor",
    "placeholder",
    "preset_processor",
    "tiny_tokenizer",
]

#: Ids of the tiny tokenizer: special tokens, the 256 byte symbols, then named tokens.
PAD, BOS, EOS = 0, 1, 2
FIRST_BYTE = 3
VOCAB_SIZE = 320
IMAGE_ID = 310  # ``image_token_id`` of every tiny config
#: Named tokens shared by every family (the image placeholder at ``IMAGE_ID`` is per family).
_NAMED = {
    300: "<|im_start|>",
    301: "<|im_end|>",
    311: "<|video_pad|>",
    312: "<|vision_start|>",
    313: "<|vision_end|>",
    314: "<img>",
    315: "</img>",
    316: "<video>",
}
_QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl")

_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
    "{% if c.type == 'image' %}IMAGE{% elif c.type == 'video' %}VIDEO"
    "{% else %}{{ c.text }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_VICUNA = (
    "{% for m in messages %}{{ m.role.upper() }}: "
    "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
    "{% if c.type == 'image' %}IMAGE{% else %}{{ c.text }}{% endif %}{% endfor %}{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class _Family:
    """How one family's preset processor is put together."""

    #: The text the processor expands into image tokens; token ``IMAGE_ID``.
    placeholder: str
    #: Tokenizer attributes the processor reads (name -> token text).
    attributes: dict[str, str]
    #: Chat template; ``IMAGE`` marks where the image goes. ``None``: the model has none.
    template: str | None
    #: What the template writes for an image.
    image_text: str
    #: What the template writes for a video (Qwen only).
    video_text: str = ""


_QWEN = _Family(
    "<|image_pad|>",
    {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    _CHATML,
    "<|vision_start|><|image_pad|><|vision_end|>",
    "<|vision_start|><|video_pad|><|vision_end|>",
)
_FAMILIES: dict[str, _Family] = {
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    # InternVLProcessor expands ``<IMG_CONTEXT>`` (its ``image_token``) into
    # ``<img>`` + image_seq_length x ``<IMG_CONTEXT>`` + ``</img>``, as the HF chat template writes.
    "internvl": _Family(
        "<IMG_CONTEXT>",
        {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        _CHATML,
        "<IMG_CONTEXT>\n",
    ),
    "llava": _Family("<image>", {"image_token": "<image>"}, _VICUNA, "<image>\n"),
    "llava_next": _Family("<image>", {"image_token": "<image>"}, _VICUNA, "<image>\n"),
    # PaliGemma is not a chat model: "<image>" x n + BOS + the task prompt + "\n".
    "paligemma": _Family("<image>", {"image_token": "<image>"}, None, ""),
}


def _family(model_type: str) -> _Family:
    try:
        return _FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"`run` does not support model_type {model_type!r} yet; supported: "
            f"{', '.join(sorted(_FAMILIES))}"
        ) from None


def placeholder(model_type: str) -> str:
    """The image placeholder text of a family's processor (token ``IMAGE_ID`` of the presets)."""
    return _family(model_type).placeholder


def tiny_tokenizer(model_type: str = "qwen2_vl") -> PreTrainedTokenizerFast:
    """The presets' tokenizer: bytes (lossless for any UTF-8 text), ChatML and image tokens.

    Ids: 0 ``<pad>``, 1 ``<s>``, 2 ``</s>``, 3..258 the byte symbols, 300/301 ``<|im_start|>`` /
    ``<|im_end|>``, 310 the family's image placeholder (``placeholder(model_type)``), 311
    ``<|video_pad|>``, 312/313 ``<|vision_start|>`` / ``<|vision_end|>``, 314/315 ``<img>`` /
    ``</img>``, 316 ``<video>``, reserved tokens for the other ids up to 319. Left padding.

    Raises:
        UnsupportedModelError: a ``model_type`` without a preset processor.
    """
    family = _family(model_type)
    named = {**_NAMED, IMAGE_ID: family.placeholder}
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS}
    vocab.update({s: FIRST_BYTE + i for i, s in enumerate(sorted(ByteLevel.alphabet()))})
    specials = [named.get(i, f"<|reserved_{i}|>") for i in range(FIRST_BYTE + 256, VOCAB_SIZE)]
    vocab.update({token: FIRST_BYTE + 256 + i for i, token in enumerate(specials)})
    backend = Tokenizer(token_models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=True)
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


def preset_processor(model_type: str, model_config: Any, image_size: ImageSize | None) -> Any:
    """The family's transformers processor around ``tiny_tokenizer``, fitted to ``image_size``.

    ``None``: a Qwen processor left to its own ``smart_resize``, for native resolution.

    Patch / merge sizes, ``image_seq_length`` and the feature selection come from
    ``model_config``, so one image gives as many placeholder tokens as the model has image
    embeddings. The image processors are the PIL ones (no torchvision needed).

    Raises:
        UnsupportedModelError: a ``model_type`` without a preset processor.
    """
    family = _family(model_type)
    tokenizer = tiny_tokenizer(model_type)
    template = family.template and family.template.replace("IMAGE", family.image_text).replace(
        "VIDEO", family.video_text
    )
    vision = model_config.vision_config
    h, w = image_size or (448, 448)  # only the fixed-size families read it
    if model_type in _QWEN_TYPES:
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size,
        )
        cls = Qwen2VLProcessor if model_type == "qwen2_vl" else Qwen2_5_VLProcessor
        processor = images_only_processor(cls)(
            image_processor, tokenizer, _video_processor(vision), chat_template=template
        )
    elif model_type == "internvl":
        processor = images_only_processor(InternVLProcessor)(
            GotOcr2ImageProcessorPil(size={"height": h, "width": w}, crop_to_patches=False),
            tokenizer,
            None,
            image_seq_length=model_config.image_seq_length,
            chat_template=template,
        )
    elif model_type == "llava_next":  # anyres tiles of the tower's own size
        tile = int(vision.image_size)
        processor = LlavaNextProcessor(
            LlavaNextImageProcessorPil(
                size={"shortest_edge": tile},
                crop_size={"height": tile, "width": tile},
                image_grid_pinpoints=model_config.image_grid_pinpoints,
            ),
            tokenizer,
            patch_size=vision.patch_size,
            vision_feature_select_strategy=model_config.vision_feature_select_strategy,
            num_additional_image_tokens=1,
            chat_template=template,
        )
    elif model_type == "paligemma":
        images = SiglipImageProcessorPil(size={"height": h, "width": w})
        images.image_seq_length = (h // vision.patch_size) * (w // vision.patch_size)
        processor = PaliGemmaProcessor(images, tokenizer, chat_template=template)
    else:
        processor = LlavaProcessor(
            CLIPImageProcessorPil(
                size={"shortest_edge": min(h, w)}, crop_size={"height": h, "width": w}
            ),
            tokenizer,
            patch_size=vision.patch_size,
            vision_feature_select_strategy=model_config.vision_feature_select_strategy,
            num_additional_image_tokens=1,
            chat_template=template,
        )
    if image_size is None:
        return processor
    return fit_processor(processor, model_type, image_size)


def _video_processor(vision: Any) -> Any:
    """Qwen's video processor for a preset, or ``None`` without torchvision (which it needs)."""
    if not is_torchvision_available():
        return None
    from transformers import Qwen2VLVideoProcessor

    return Qwen2VLVideoProcessor(
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
    )


def native_processor(processor: Any, pixel_range: tuple[int, int] | None) -> Any:
    """A Qwen processor left to its own ``smart_resize``, inside ``pixel_range`` if given.

    The checkpoint's min / max pixels stay unless the encoder takes less (a native artifact
    exported for a narrower range): then the bounds are narrowed to the artifact's. Pads on
    the left, as decoding needs. Returns ``processor`` (changed in place).
    """
    processor.tokenizer.padding_side = "left"
    if pixel_range is not None:
        images = processor.image_processor
        size = dict(images.size or {})
        low = max(pixel_range[0], int(size.get("shortest_edge") or 0))
        high = min(pixel_range[1], int(size.get("longest_edge") or pixel_range[1]))
        images.size = {"shortest_edge": low, "longest_edge": max(low, high)}
    return processor


def load_processor(loaded: LoadedModel, image_size: ImageSize | None) -> Any:
    """The model's processor (checkpoint directory or preset), fitted to ``image_size``.

    ``None``: unfitted, for native resolution.

    Raises:
        UnsupportedModelError: a family without runtime support.
        ConfigError: a preset without an LLM.
        ArtifactError: a checkpoint directory whose processor files do not load.
        BackendUnavailableError: its processor needs torchvision, which is missing.
    """
    model_type = loaded.adapter.model_types[0]
    _family(model_type)
    if loaded.name in PRESETS:
        if loaded.model is None:
            raise ConfigError(
                f"{loaded.name} has no LLM; `run` needs a full multimodal model (a tiny-* preset "
                "or a checkpoint directory)"
            )
        return preset_processor(model_type, loaded.model.config, image_size)
    try:
        processor = AutoProcessor.from_pretrained(Path(loaded.name))
    except (OSError, ValueError, TypeError, AttributeError, ImportError) as err:
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        if "torchvision" in reason.lower() and model_type in _QWEN_TYPES:
            processor = _images_only_checkpoint_processor(Path(loaded.name), model_type)
        elif "torchvision" in reason.lower():
            raise BackendUnavailableError(
                f"the processor of {loaded.name} needs torchvision (transformers' Qwen / "
                f"InternVL processors load a video processor), which is not installed; pip "
                f"install the torchvision release that matches torch {torch.__version__}"
            ) from None
        else:
            raise ArtifactError(
                f"could not load the processor of {loaded.name}: {reason or type(err).__name__}; "
                "the directory needs the processor and tokenizer files saved with the model"
            ) from None
    if image_size is None:
        return processor
    return fit_processor(processor, model_type, image_size)


def _images_only_checkpoint_processor(path: Path, model_type: str) -> Any:
    """A Qwen checkpoint's processor without its video processor (which needs torchvision).

    Its own image processor (the PIL one), tokenizer and chat template; images only.
    """
    cls = Qwen2VLProcessor if model_type == "qwen2_vl" else Qwen2_5_VLProcessor
    try:
        images = AutoImageProcessor.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, ImportError) as err:
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        raise ArtifactError(
            f"could not load the image processor / tokenizer of {path}: "
            f"{reason or type(err).__name__}; the directory needs the files saved with the model"
        ) from None
    template = getattr(tokenizer, "chat_template", None)
    return images_only_processor(cls)(images, tokenizer, None, chat_template=template)


def fit_processor(processor: Any, model_type: str, image_size: ImageSize) -> Any:
    """Make ``processor`` turn every image into one tile of exactly ``image_size`` (H, W).

    Qwen2-VL / Qwen2.5-VL: min = max pixels = H * W, and every image resized to H x W (not
    only those of H x W already: ``smart_resize`` alone keeps the aspect ratio). InternVL: a
    resize to H x W, no ``crop_to_patches``. LLaVA: shortest edge to min(H, W), center crop
    H x W. PaliGemma: a resize to H x W. The tokenizer pads on the left, as decoding needs
    (checkpoint tokenizers often pad on the right). Returns ``processor`` (changed in place).

    Raises:
        UnsupportedModelError: a family without runtime support.
        ConfigError: LLaVA-NeXT, whose LLM takes its anyres tiles (``tile_processor``).
    """
    _family(model_type)
    h, w = (int(s) for s in image_size)
    processor.tokenizer.padding_side = "left"
    images = processor.image_processor
    images.do_resize = True
    if model_type in _QWEN_TYPES:
        images.size = {"shortest_edge": h * w, "longest_edge": h * w}
        exact_size_image_processor(images, h, w)
    elif model_type == "paligemma":
        images.size = {"height": h, "width": w}  # the tower's one size: image_seq_length fits
    elif model_type == "llava_next":
        raise ConfigError(
            "LLaVA-NeXT's LLM takes its anyres tiles packed into the image grid, not one "
            "image of a fixed size; drop --image-size"
        )
    elif model_type == "internvl":
        images.size = {"height": h, "width": w}
        images.crop_to_patches = False
        # InternVLProcessor's class-level ``images_kwargs`` asks for crop_to_patches=True at
        # every call, over the image processor's own setting.
        processor.images_kwargs = {
            **getattr(processor, "images_kwargs", {}),
            "crop_to_patches": False,
        }
    else:
        images.size = {"shortest_edge": min(h, w)}
        images.do_center_crop = True
        images.crop_size = {"height": h, "width": w}
    return processor


def tile_processor(processor: Any, model_type: str, tile: ImageSize) -> Any:
    """The processor with the model's own tiling into ``tile`` (H, W) tiles.

    InternVL: each image becomes the grid of tiles its aspect ratio fits best
    (``min_patches`` .. ``max_patches``) plus a thumbnail when there are several
    (``crop_to_patches``, which ``InternVLProcessor`` asks for at every call). LLaVA-NeXT:
    the base image plus the crops of the ``image_grid_pinpoints`` resolution that fits best
    (anyres), left as the processor has them. Pads on the left, as decoding needs. Returns
    ``processor`` (changed in place).
    """
    processor.tokenizer.padding_side = "left"
    if model_type == "internvl":
        images = processor.image_processor
        images.do_resize = True
        images.size = {"height": int(tile[0]), "width": int(tile[1])}
    return processor


def tile_counts(processor: Any, sizes: list[tuple[int, int]]) -> list[int]:
    """Tiles ``tile_processor``'s processor makes of images of ``sizes`` ((width, height))."""
    images = processor.image_processor
    options = getattr(processor, "images_kwargs", {})
    return [images.get_number_of_image_patches(h, w, options) for w, h in sizes]


def image_rows(model_type: str, pixel_values: torch.Tensor, tiles: list[int]) -> torch.Tensor:
    """The processor's ``pixel_values`` of images of ``tiles`` tiles each, in row form [T, ...].

    Qwen-style processors flatten every image's patches (merge-window order, as the tower
    reads them) into [B * n, C * t * p * p]; the row form is [B, n, C * t * p * p]. Anyres
    processors pad every image to the most tiles, [B, max tiles, C, H, W]: the row form is each
    image's own tiles. Tiles [T, C, H, W] are rows already.
    """
    if model_type in _QWEN_TYPES:
        return pixel_values.reshape(len(tiles), -1, pixel_values.shape[-1])
    if pixel_values.ndim == 5:
        return torch.cat([image[:n] for image, n in zip(pixel_values, tiles, strict=True)])
    return pixel_values
