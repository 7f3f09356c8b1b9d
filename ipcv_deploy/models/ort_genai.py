"""What an ONNX Runtime GenAI package needs to know of a family (onnxruntime-genai 0.18).

ONNX Runtime GenAI runs Qwen2-VL / Qwen2.5-VL as its ``qwen2_5_vl`` type: a vision model
(ours, ``pixel_values`` + ``image_grid_thw`` -> image features), an embedding model (input ids
and image features -> ``inputs_embeds``) and the text decoder its model builder exports. It
computes the mRoPE positions itself from the input ids and the grid. Facts of 0.18 this relies
on: the builder has no Qwen2-VL branch, but Qwen2-VL's LLM is Qwen2.5-VL's (same decoder,
same mRoPE), so the LLM config is presented to it as Qwen2.5-VL's with a one-block dummy
vision config and no vision weights; the builder writes no vision / embedding section and no
image token ids into ``genai_config.json`` (``genai_sections`` does); its image processor is
ONNX Runtime Extensions' ``qwen2_5_image_processor`` (``processor_config``), whose cubic
resize differs slightly from PIL's (pixels within ~0.03 when an image needs resizing).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "GENAI_MODEL_TYPES",
    "GENAI_TYPE",
    "builder_config",
    "genai_families",
    "genai_sections",
    "llm_state_dict",
    "processor_config",
]

#: Model types an ONNX Runtime GenAI package is written for.
GENAI_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
#: The ``model.type`` of the package's genai_config.json.
GENAI_TYPE = "qwen2_5_vl"


def genai_families() -> str:
    """Display names of the families a package is written for, e.g. ``"Qwen2-VL / ..."``."""
    from ipcv_deploy.models.base import get_adapter

    return " / ".join(get_adapter(t).family for t in GENAI_MODEL_TYPES)


def builder_config(config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as the builder's Qwen2.5-VL branch reads it.

    The LLM part is kept; the vision part is a one-block dummy (the builder instantiates the
    whole model class but exports only the decoder).
    """
    text = dict(config["text_config"])
    text["model_type"] = "qwen2_5_vl_text"
    vision = config["vision_config"]
    return {
        **config,
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "text_config": text,
        "vision_config": {
            "model_type": "qwen2_5_vl",
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 1,
            "out_hidden_size": text["hidden_size"],
            "fullatt_block_indexes": [0],
            "spatial_merge_size": vision.get("spatial_merge_size", 2),
            "patch_size": vision.get("patch_size", 14),
            "temporal_patch_size": vision.get("temporal_patch_size", 2),
            "window_size": vision.get("window_size", 112),
        },
    }


def llm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full model's weights without the vision tower (``lm_head`` unshared)."""
    state = {
        name: tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if not name.startswith(("model.visual.", "visual."))
    }
    state["lm_head.weight"] = state["lm_head.weight"].clone()  # may be tied to the embedding
    return state


def genai_sections(
    config: dict[str, Any], vision_file: str, output_name: str, embedding_file: str
) -> dict[str, Any]:
    """The ``model`` entries of genai_config.json the builder does not write.

    Args:
        config: the checkpoint's ``config.json``.
        vision_file: the vision ONNX, relative to the package.
        output_name: the vision graph's output (``image_embeds``).
        embedding_file: the embedding ONNX, relative to the package.
    """
    vision = config["vision_config"]
    session = {"log_id": "onnxruntime-genai", "provider_options": []}
    section = {
        "filename": vision_file,
        "config_filename": "processor_config.json",
        "spatial_merge_size": vision.get("spatial_merge_size", 2),
        "patch_size": vision.get("patch_size", 14),
        "tokens_per_second": float(vision.get("tokens_per_second", 2.0)),
        "inputs": {"pixel_values": "pixel_values", "image_grid_thw": "image_grid_thw"},
        "outputs": {"image_features": output_name},
        "session_options": session,
    }
    if "window_size" in vision:
        section["window_size"] = vision["window_size"]
    return {
        "type": GENAI_TYPE,
        "image_token_id": config["image_token_id"],
        "video_token_id": config["video_token_id"],
        "vision_start_token_id": config["vision_start_token_id"],
        "vision": section,
        "embedding": {
            "filename": embedding_file,
            "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
            "outputs": {"inputs_embeds": "inputs_embeds"},
            "session_options": session,
        },
    }


def processor_config(image_processor: Any, pixel_range: tuple[int, int]) -> dict[str, Any]:
    """ONNX Runtime Extensions' image pipeline equal to the transformers image processor.

    ``pixel_range`` (min, max pixels) is the processor's range narrowed to the vision
    artifact's, so both sides resize an image to the same grid.
    """
    size = image_processor.size or {}
    low = max(pixel_range[0], int(size.get("shortest_edge") or 0))
    high = min(pixel_range[1], int(size.get("longest_edge") or pixel_range[1]))
    patch, merge = image_processor.patch_size, image_processor.merge_size

    def op(name: str, kind: str, **attrs: Any) -> dict[str, Any]:
        return {"operation": {"name": name, "type": kind, **({"attrs": attrs} if attrs else {})}}

    return {
        "processor": {
            "name": "qwen2_5_image_processor",
            "transforms": [
                op("decode_image", "DecodeImage", color_space="RGB"),
                op("convert_to_rgb", "ConvertRGB"),
                op(
                    "resize",
                    "Resize",
                    width=540,  # unused with smart_resize
                    height=360,
                    smart_resize=1,
                    min_pixels=low,
                    max_pixels=max(low, high),
                    patch_size=patch,
                    merge_size=merge,
                    interpolation="CUBIC",
                ),
                op("rescale", "Rescale", rescale_factor=image_processor.rescale_factor),
                op(
                    "normalize",
                    "Normalize",
                    mean=list(image_processor.image_mean),
                    std=list(image_processor.image_std),
                    qwen2_5_vl=1,
                ),
                op(
                    "patch_image",
                    "PatchImage",
                    patch_size=patch,
                    temporal_patch_size=image_processor.temporal_patch_size,
                    merge_size=merge,
                ),
            ],
        }
    }
