"""LLaVA-1.5 and LLaVA-NeXT vision towers (transformers' ``CLIPVisionModel``, ViT-L/14-336).

One image per batch row with a CLS token, absolute position embeddings and ``pre_layrnorm``.
LLaVA takes the features of the penultimate block (``vision_feature_layer=-2``), so the
compressed tower runs the blocks up to that layer only and restores every token there; the
projector (CLS dropped, two-layer MLP) runs outside the tower, on the restored tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ipcv_deploy.compression import EncodedInput, TokenSet
from ipcv_deploy.compression.cost import EncoderShape
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.errors import ConfigError, InputError, UnsupportedModelError
from ipcv_deploy.models.base import FixedImageAdapter, ImageSize, register_adapter, tiny_text_config
from ipcv_deploy.models.prenorm_vit import prenorm_block, prenorm_stabilized_block

__all__ = ["LlavaAdapter", "LlavaNextAdapter"]

#: Attribute on the tower holding the LLaVA config's vision_feature_layer.
_FEATURE_LAYER = "_ipcv_feature_layer"


@dataclass
class _Tiles:
    tokens: int  # N = 1 + patches per image
    feature_index: int  # index of the restored tensor in ``hidden_states`` (0 = embeddings)
    total_states: int  # len(hidden_states) of the dense tower: blocks + 1


@register_adapter
class LlavaAdapter(FixedImageAdapter):
    """LLaVA-1.5: per-image selection with CLS always kept, features at the feature layer."""

    family = "LLaVA-1.5 (CLIP)"
    model_types = ("llava",)
    vision_class_names = ("CLIPVisionModel",)
    num_prefix_tokens = 1
    global_topk_spans_call = False
    # No reference settings were published for CLIP; these are ours (K early, AS short).
    reference = IPCVConfig(prune_layer=3, keep_ratio=0.35, as_layers=3, num_neighbors=10)
    full_model_class = LlavaForConditionalGeneration
    tower_attribute = "vision_tower"

    @classmethod
    def vision_tower(cls, model: nn.Module) -> nn.Module:
        """The CLIP tower; remembers the model's ``vision_feature_layer`` on it."""
        inner = getattr(model, "model", model)
        tower = inner.vision_tower
        if type(tower).__name__ not in LlavaAdapter.vision_class_names:
            raise UnsupportedModelError(
                f"this LLaVA model uses a {type(tower).__name__} vision tower; the LLaVA adapter "
                "serves CLIP towers (LLaVA-1.5, LLaVA-NeXT)"
            )
        layer = inner.config.vision_feature_layer
        if not isinstance(layer, int):
            raise UnsupportedModelError(
                f"vision_feature_layer={layer} concatenates several layers; IPCV restores tokens "
                "at one layer only"
            )
        setattr(tower, _FEATURE_LAYER, layer)
        return tower

    @property
    def _states(self) -> int:
        return len(self.vision.encoder.layers) + 1

    @property
    def _feature_index(self) -> int:
        layer = getattr(self.vision, _FEATURE_LAYER, -2)
        return layer % self._states

    @property
    def depth(self) -> int:
        """Blocks run: those up to the feature layer (all but the last for LLaVA-1.5)."""
        return self._feature_index

    def example_inputs(
        self, image_size: ImageSize, batch: int, generator: torch.Generator
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``pixel_values`` [B, 3, H, W], asking for the feature layer as LLaVA does."""
        (pixels,), _ = super().example_inputs(image_size, batch, generator)
        return (pixels,), {"output_hidden_states": self._feature_index - self._states}

    def encoder_shape(self, image_size: ImageSize) -> EncoderShape:
        """The blocks up to the feature layer, and the patch embedding (CLS included)."""
        self.check_image_size(image_size)
        cfg = self.vision.config
        patches = (image_size[0] // cfg.patch_size) * (image_size[1] // cfg.patch_size)
        return EncoderShape(
            depth=self.depth,
            width=cfg.hidden_size,
            mlp_hidden=cfg.intermediate_size,
            mlp_matrices=2,
            tokens=patches + 1,
            num_prefix=1,
            embed_flops=2 * patches * cfg.num_channels * cfg.patch_size**2 * cfg.hidden_size,
            head_flops=0,
        )

    def features(self, output: BaseModelOutputWithPooling) -> torch.Tensor:
        """The hidden states at the feature layer [images, N, D]: the projector's input."""
        return output.hidden_states[self._feature_index]

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4:
            raise InputError(
                "pixel_values must be [images, channels, height, width], "
                f"got {tuple(pixel_values.shape)}"
            )
        return self.vision.pre_layrnorm(self.vision.embeddings(pixel_values))

    def _context(self, tokens: int) -> _Tiles:
        return _Tiles(tokens, self._feature_index, self._states)

    def embed(self, pixel_values: torch.Tensor, **kwargs: Any) -> EncodedInput:
        """Patch + position embeddings, CLS, ``pre_layrnorm``; the images packed in one row."""
        wanted = kwargs.get("output_hidden_states")
        allowed = {self._feature_index, self._feature_index - self._states}
        if wanted not in (None, False, *allowed) and wanted not in ([i] for i in allowed):
            raise ConfigError(
                f"output_hidden_states={wanted!r}: an IPCV-compressed LLaVA tower only has the "
                f"feature layer's hidden states (index {self._feature_index - self._states}); "
                "use remove_ipcv() to inspect other blocks"
            )
        if kwargs.get("output_attentions"):
            raise ConfigError("output_attentions is not available from an IPCV-compressed encoder")
        emb = self._embed(pixel_values)
        images, tokens, width = emb.shape
        return EncodedInput(
            emb.reshape(1, images * tokens, width), (tokens,) * images, self._context(tokens)
        )

    def embed_rows(self, pixels: torch.Tensor, context: Any) -> EncodedInput:
        """Embed [B, 3, H, W]: one image per row, one segment."""
        emb = self._embed(pixels)
        return EncodedInput(emb, (emb.shape[1],), self._context(emb.shape[1]))

    def block(
        self, index: int, x: torch.Tensor, enc: EncodedInput, tokens: TokenSet
    ) -> torch.Tensor:
        """``CLIPEncoderLayer`` on [images, n, D]."""
        return prenorm_block(self.vision.encoder.layers[index], x, tokens)

    def stabilized_block(
        self, index: int, full: torch.Tensor, enc: EncodedInput, kept: TokenSet
    ) -> torch.Tensor:
        """Kept-token queries over all keys/values of each image (spec section 3)."""
        return prenorm_stabilized_block(self.vision.encoder.layers[index], full, enc, kept)

    def head(self, full: torch.Tensor, enc: EncodedInput) -> BaseModelOutputWithPooling:
        """The restored tokens as the feature layer's hidden states.

        The other layers are ``None``, as transformers returns them when one layer is selected.
        """
        tiles: _Tiles = enc.context
        restored = full.reshape(-1, tiles.tokens, full.shape[-1])
        states: list[torch.Tensor | None] = [None] * tiles.total_states
        states[tiles.feature_index] = restored
        return BaseModelOutputWithPooling(
            last_hidden_state=restored,
            pooler_output=self.vision.post_layernorm(restored[:, 0, :]),
            hidden_states=tuple(states),
        )

    def projector(self, model: nn.Module) -> nn.Module | None:
        """LLaVA's path from the feature layer to LLM embeddings: CLS drop, MLP projector."""
        inner = getattr(model, "model", model)
        if not hasattr(inner, "multi_modal_projector"):
            return None
        return _Projector(inner)


class _Projector(nn.Module):
    """``LlavaModel.get_image_features`` after the tower: [B, 1 + n, D] -> [B, n, H]."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.drop_cls = inner.config.vision_feature_select_strategy == "default"
        self.multi_modal_projector = inner.multi_modal_projector

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """CLS drop (``default`` strategy), then the projector."""
        return self.multi_modal_projector(features[:, 1:] if self.drop_cls else features)


def tiny_config(depth: int = 7, image_size: int = 112) -> LlavaConfig:
    """A few-block LLaVA (CLIP tower) with a 4-layer Llama LLM for tests (vocab 320)."""
    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=depth,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=14,
            initializer_range=0.1,
            initializer_factor=5.0,
        ),
        text_config=tiny_text_config("llama"),
        image_token_index=310,
        image_seq_length=(image_size // 14) ** 2,
    )


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT: the same CLIP tower on every anyres tile (base image + crops), per tile.

    Tiles are images to the tower, so selection is per tile with CLS kept; the tile grid
    packing and the ``image_newline`` tokens come after the projector, on restored features.
    """

    family = "LLaVA-NeXT (CLIP, anyres)"
    model_types = ("llava_next",)
    vision_class_names = ()  # a bare CLIP tower is served by LlavaAdapter
    full_model_class = LlavaNextForConditionalGeneration


def tiny_next_config(depth: int = 7, tile: int = 112) -> LlavaNextConfig:
    """``tiny_config``'s tower and LLM as LLaVA-NeXT, with anyres grids of up to 2x2 tiles."""
    base = tiny_config(depth, tile)
    return LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_index=310,
        image_grid_pinpoints=[[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]],
        image_seq_length=(tile // 14) ** 2,
    )
