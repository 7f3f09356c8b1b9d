"""InternVL3 vision tower (transformers' ``InternVLVisionModel``, InternViT).

One 448x448 tile per batch row with a CLS token, absolute position embeddings, layer scale;
the pixel-shuffle projector runs outside the tower, on the restored tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import InternVLConfig, InternVLForConditionalGeneration
from transformers.models.internvl.modeling_internvl import InternVLVisionModelOutputWithPooling

from ipcv_deploy.compression import EncodedInput, TokenSet, gather_tokens, segment_attention
from ipcv_deploy.compression.cost import EncoderShape
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.errors import InputError, UnsupportedModelError
from ipcv_deploy.models.base import (
    FixedImageAdapter,
    ImageSize,
    register_adapter,
    reject_layer_outputs,
    tiny_text_config,
)

__all__ = ["InternVLAdapter"]


@dataclass
class _Tiles:
    tokens: int  # N = 1 + patches per tile


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (value, value)


@register_adapter
class InternVLAdapter(FixedImageAdapter):
    """InternVL3: per-tile selection with CLS always kept.

    ``global`` pools neighbours over every tile of the call, as the reference does.
    """

    family = "InternVL3"
    model_types = ("internvl",)
    vision_class_names = ("InternVLVisionModel",)
    num_prefix_tokens = 1
    global_topk_spans_call = False

    image_unit = "tiles"
    size_hint = " (larger images are split into tiles by the processor)"
    reference = IPCVConfig(prune_layer=7, keep_ratio=0.35, as_layers=3, num_neighbors=10)
    full_model_class = InternVLForConditionalGeneration
    tower_attribute = "vision_tower"

    @property
    def depth(self) -> int:
        """Number of InternViT layers."""
        return len(self.vision.encoder.layer)

    def encoder_shape(self, image_size: ImageSize) -> EncoderShape:
        """Blocks and patch embedding at ``image_size`` (CLS token included)."""
        self.check_image_size(image_size)
        cfg = self.vision.config
        ph, pw = _pair(cfg.patch_size)
        patches = (image_size[0] // ph) * (image_size[1] // pw)
        return EncoderShape(
            depth=self.depth,
            width=cfg.hidden_size,
            mlp_hidden=cfg.intermediate_size,
            mlp_matrices=2,
            tokens=patches + 1,
            num_prefix=1,
            embed_flops=2 * patches * cfg.num_channels * ph * pw * cfg.hidden_size,
            head_flops=0,
        )

    def features(self, output: InternVLVisionModelOutputWithPooling) -> torch.Tensor:
        """``last_hidden_state`` [tiles, N, D], the projector's input."""
        return output.last_hidden_state

    def embed(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> EncodedInput:
        """Patch + position embeddings with CLS; the tiles packed in one row, a segment each."""
        reject_layer_outputs(kwargs, self.depth)
        if pixel_values.ndim != 4:
            raise InputError(
                "pixel_values must be [tiles, channels, height, width], "
                f"got {tuple(pixel_values.shape)}"
            )
        emb = self.vision.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)
        tiles, tokens, width = emb.shape
        return EncodedInput(
            emb.reshape(1, tiles * tokens, width), (tokens,) * tiles, _Tiles(tokens)
        )

    def embed_rows(self, pixels: torch.Tensor, context: Any) -> EncodedInput:
        """Embed [B, 3, H, W]: one tile per row, one segment."""
        emb = self.vision.embeddings(pixels)
        return EncodedInput(emb, (emb.shape[1],), _Tiles(emb.shape[1]))

    def block(
        self, index: int, x: torch.Tensor, enc: EncodedInput, tokens: TokenSet
    ) -> torch.Tensor:
        """``InternVLVisionLayer`` on [tiles, n, D]: every tile holds the same token count."""
        per_tile = tokens.lengths[0]
        assert all(n == per_tile for n in tokens.lengths), "InternVL keeps a fixed count per tile"
        layer = self.vision.encoder.layer[index]
        return layer(x.reshape(-1, per_tile, x.shape[-1])).reshape(x.shape)

    def stabilized_block(
        self, index: int, full: torch.Tensor, enc: EncodedInput, kept: TokenSet
    ) -> torch.Tensor:
        """Kept-token queries over all keys/values of each tile (spec section 3)."""
        assert kept.index is not None
        layer = self.vision.encoder.layer[index]
        attn = layer.attention
        idx, heads = kept.index, attn.num_heads
        h = layer.layernorm_before(full)
        q = attn.q_norm(attn.q_proj(gather_tokens(h, idx))).unflatten(-1, (heads, -1))
        k = attn.k_norm(attn.k_proj(h)).unflatten(-1, (heads, -1))
        v = attn.v_proj(h).unflatten(-1, (heads, -1))
        out = segment_attention(q, k, v, kept.lengths, enc.segments)
        out = attn.projection_dropout(attn.projection_layer(out.flatten(2)))
        x = gather_tokens(full, idx) + layer.lambda_1 * out
        return x + layer.lambda_2 * layer.dropout(layer.mlp(layer.layernorm_after(x)))

    def head(self, full: torch.Tensor, enc: EncodedInput) -> InternVLVisionModelOutputWithPooling:
        """Final norm on [tiles, N, D]; the projector (pixel shuffle + mlp1) follows outside."""
        tiles: _Tiles = enc.context
        out = self.vision.layernorm(full.reshape(-1, tiles.tokens, full.shape[-1]))
        return InternVLVisionModelOutputWithPooling(last_hidden_state=out)

    def projector(self, model: nn.Module) -> nn.Module | None:
        """``get_image_features`` after the tower: CLS drop, pixel shuffle, ``mlp1`` projector."""
        inner = getattr(model, "model", model)
        if not hasattr(inner, "multi_modal_projector"):
            return None
        if inner.config.vision_feature_layer not in (-1, self.depth - 1):
            raise UnsupportedModelError(
                f"vision_feature_layer={inner.config.vision_feature_layer} takes features from "
                "inside the tower, where IPCV has pruned tokens; only the last layer (-1) works"
            )
        return _Projector(inner)


class _Projector(nn.Module):
    """InternVL's path from tower features [B, 1 + n, D] to LLM embeddings [B, n / 4, H]."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.drop_cls = inner.config.vision_feature_select_strategy == "default"
        self.ratio = float(inner.config.downsample_ratio)
        self.multi_modal_projector = inner.multi_modal_projector

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Same steps as ``InternVLModel.get_image_features`` after the tower."""
        if self.drop_cls:
            features = features[:, 1:, :]
        side, width = math.isqrt(features.shape[1]), features.shape[-1]
        scale, small = round(1 / self.ratio), side * self.ratio
        # Pixel shuffle: fold scale x scale neighbours into channels, in InternVL's order.
        grid = features.reshape(-1, side, int(small), width * scale)
        grid = grid.permute(0, 2, 1, 3).reshape(-1, int(small), int(small), width * scale**2)
        grid = grid.permute(0, 2, 1, 3)
        return self.multi_modal_projector(grid.flatten(1, 2))


def tiny_config(depth: int = 10, image_size: int = 112) -> InternVLConfig:
    """A few-block InternVL with a 4-layer Qwen2 LLM for tests and ``demo`` (vocab 320)."""
    return InternVLConfig(
        vision_config={
            "hidden_size": 64,
            "num_hidden_layers": depth,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "image_size": [image_size, image_size],
            "patch_size": [14, 14],
            "attention_bias": True,
            "layer_scale_init_value": 1.0,
            "initializer_range": 0.1,
        },
        text_config=tiny_text_config("qwen2"),
        image_token_id=310,
        image_seq_length=(image_size // 28) ** 2,
    )
