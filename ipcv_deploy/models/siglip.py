"""PaliGemma's vision tower (transformers' ``SiglipVisionModel``, SigLIP So400m).

One image per batch row, no CLS token, learned position embeddings, ``post_layernorm`` after
the last block; PaliGemma's linear projector runs outside the tower on the restored tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ipcv_deploy.compression import EncodedInput, TokenSet
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.models.base import (
    FixedImageAdapter,
    register_adapter,
    tiny_text_config,
)
from ipcv_deploy.models.prenorm_vit import prenorm_block, prenorm_stabilized_block

__all__ = ["SiglipAdapter"]


@register_adapter
class SiglipAdapter(FixedImageAdapter):
    """PaliGemma (SigLIP): per-image selection, no prefix token, features after the last block."""

    family = "PaliGemma (SigLIP)"
    model_types = ("paligemma",)
    vision_class_names = ("SiglipVisionModel",)
    num_prefix_tokens = 0
    global_topk_spans_call = False
    # No reference settings were published for SigLIP; these are ours.
    reference = IPCVConfig(prune_layer=3, keep_ratio=0.35, as_layers=3, num_neighbors=10)
    full_model_class = PaliGemmaForConditionalGeneration
    tower_attribute = "vision_tower"
    position_offset = 1  # PaliGemma's positions count from 1

    @classmethod
    def prefix_blocks(cls, batch: Any) -> torch.Tensor:
        """The prefix-LM blocks, as PaliGemma was trained.

        Image and prompt (``token_type_ids`` 0) attend to each other both ways, generated
        tokens causally.
        """
        return torch.where(batch["token_type_ids"] == 0, 0, -1)

    @classmethod
    def plain_prompt(cls, prompt: str, placeholder: str, images: int) -> str:
        """The images, then the task text; the processor adds BOS and the closing newline."""
        return placeholder * images + prompt

    @property
    def depth(self) -> int:
        """Number of SigLIP encoder layers."""
        return len(self.vision.encoder.layers)

    def features(self, output: BaseModelOutputWithPooling) -> torch.Tensor:
        """``last_hidden_state`` [images, N, D] after ``post_layernorm``: the projector's input."""
        return output.last_hidden_state

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch + position embeddings."""
        return self.vision.embeddings(pixel_values)

    def block(
        self, index: int, x: torch.Tensor, enc: EncodedInput, tokens: TokenSet
    ) -> torch.Tensor:
        """``SiglipEncoderLayer`` on [images, n, D]."""
        return prenorm_block(self.vision.encoder.layers[index], x, tokens)

    def stabilized_block(
        self, index: int, full: torch.Tensor, enc: EncodedInput, kept: TokenSet
    ) -> torch.Tensor:
        """Kept-token queries over all keys/values of each image (spec section 3)."""
        return prenorm_stabilized_block(self.vision.encoder.layers[index], full, enc, kept)

    def head(self, full: torch.Tensor, enc: EncodedInput) -> BaseModelOutputWithPooling:
        """``post_layernorm`` (and the attention-pooling head, if the tower has one)."""
        out = self.vision.post_layernorm(self.images(full, enc))
        pooled = self.vision.head(out) if getattr(self.vision, "use_head", False) else None
        return BaseModelOutputWithPooling(last_hidden_state=out, pooler_output=pooled)


def tiny_config(depth: int = 6, image_size: int = 112) -> PaliGemmaConfig:
    """A few-block PaliGemma (SigLIP tower) with a 4-layer Gemma LLM for tests (vocab 320)."""
    return PaliGemmaConfig(
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": depth,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 14,
            "projection_dim": 96,
            "vision_use_head": False,  # as PaliGemma's SigLIP
        },
        text_config=tiny_text_config("gemma", head_dim=24),
        image_token_index=310,
        vocab_size=320,
        projection_dim=96,
        hidden_size=96,
    )
