"""InternVL3 vision tower (transformers' ``InternVLVisionModel``, InternViT).

One 448x448 tile per batch row with a CLS token, absolute position embeddings, layer scale;
the pixel-shuffle projector runs outside the tower, on the restored tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import InternVLConfig, InternVLForConditionalGeneration
from transformers.models.internvl.modeling_internvl import InternVLVisionModelOutputWithPooling

from ipcv_deploy.compression import EncodedInput, TokenSet, gather_tokens, segment_attention
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.errors import UnsupportedModelError
from ipcv_deploy.models.base import (
    FeatureProjector,
    FixedImageAdapter,
    register_adapter,
    reject_layer_outputs,
    tiny_text_config,
)

__all__ = ["InternVLAdapter"]


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
    dynamic_tiles = True

    image_unit = "tiles"
    size_hint = " (larger images are split into tiles by the processor)"
    reference = IPCVConfig(prune_layer=7, keep_ratio=0.35, as_layers=3, num_neighbors=10)
    full_model_class = InternVLForConditionalGeneration
    tower_attribute = "vision_tower"

    @property
    def depth(self) -> int:
        """Number of InternViT layers."""
        return len(self.vision.encoder.layer)

    def features(self, output: InternVLVisionModelOutputWithPooling) -> torch.Tensor:
        """``last_hidden_state`` [tiles, N, D], the projector's input."""
        return output.last_hidden_state

    def _embed_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``bool_masked_pos`` goes to the embeddings; per-layer outputs are refused."""
        kwargs = dict(kwargs)
        options = {"bool_masked_pos": kwargs.pop("bool_masked_pos", None)}
        reject_layer_outputs(kwargs, self.depth)
        return options

    def _embed(
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Patch + position embeddings with CLS."""
        return self.vision.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)

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
        return InternVLVisionModelOutputWithPooling(
            last_hidden_state=self.vision.layernorm(self.images(full, enc))
        )

    @classmethod
    def vision_tower(cls, model: nn.Module) -> nn.Module:
        """The InternViT inside a full model whose LLM takes the tower's last layer."""
        inner = getattr(model, "model", model)
        _check_feature_layer(inner)
        return inner.vision_tower

    def _projector(self, inner: nn.Module) -> nn.Module:
        """CLS drop, pixel shuffle, ``mlp1`` projector (``get_image_features`` after the tower)."""
        _check_feature_layer(inner)
        return _PixelShuffleProjector(inner)


def _check_feature_layer(inner: nn.Module) -> None:
    """Only ``vision_feature_layer = -1`` (the tower's ``last_hidden_state``) works with IPCV.

    ``get_image_features`` reads any other layer from ``hidden_states``, where ``hidden_states[i]``
    is the output of block ``i - 1``: inside the tower, where IPCV has pruned tokens.
    """
    layer = inner.config.vision_feature_layer
    if layer != -1:
        raise UnsupportedModelError(
            f"vision_feature_layer={layer} takes features from hidden_states[{layer}], inside "
            "the tower where IPCV has pruned tokens; only the last layer (-1) works with IPCV"
        )


class _PixelShuffleProjector(FeatureProjector):
    """InternVL's path from tower features [B, 1 + n, D] to LLM embeddings [B, n / 4, H]."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__(inner)
        self.ratio = float(inner.config.downsample_ratio)

    def rearrange(self, features: torch.Tensor) -> torch.Tensor:
        """Pixel shuffle: fold scale x scale neighbours into channels, in InternVL's order."""
        side, width = math.isqrt(features.shape[1]), features.shape[-1]
        scale, small = round(1 / self.ratio), int(side * self.ratio)
        grid = features.reshape(-1, side, small, width * scale)
        grid = grid.permute(0, 2, 1, 3).reshape(-1, small, small, width * scale**2)
        return grid.permute(0, 2, 1, 3).flatten(1, 2)


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
