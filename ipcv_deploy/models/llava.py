"""LLaVA-1.5 and LLaVA-NeXT vision towers (transformers' ``CLIPVisionModel``, ViT-L/14-336).

One image per batch row with a CLS token, absolute position embeddings and ``pre_layrnorm``.
LLaVA takes the features of the penultimate block (``vision_feature_layer=-2``), so inside
LLaVA the compressed tower runs the blocks up to that layer only and restores every token
there; the projector (CLS dropped, two-layer MLP) runs outside the tower, on the restored
tokens. A bare ``CLIPVisionModel`` runs all its blocks, like the dense tower.
"""

from __future__ import annotations

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
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from ipcv_deploy.compression import EncodedInput, TokenSet
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.errors import ConfigError, UnsupportedModelError
from ipcv_deploy.models.base import FixedImageAdapter, ImageSize, register_adapter, tiny_text_config
from ipcv_deploy.models.prenorm_vit import prenorm_block, prenorm_stabilized_block

__all__ = ["LlavaAdapter", "LlavaNextAdapter"]

#: Attribute on the tower holding the LLaVA config's vision_feature_layer.
_FEATURE_LAYER = "_ipcv_feature_layer"


def set_feature_layer(tower: nn.Module, layer: int) -> nn.Module:
    """Mark a CLIP tower as LLaVA's, whose LLM takes the hidden states of ``layer``.

    IPCV then runs only the blocks up to that layer and restores every token there. A bare
    tower (not marked) runs all blocks and behaves like the dense tower.
    """
    setattr(tower, _FEATURE_LAYER, layer)
    return tower


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
        return set_feature_layer(tower, layer)

    @property
    def _states(self) -> int:
        return len(self.vision.encoder.layers) + 1

    @property
    def _feature_layer(self) -> int | None:
        """LLaVA's ``vision_feature_layer`` when the tower is LLaVA's, else ``None``."""
        return getattr(self.vision, _FEATURE_LAYER, None)

    @property
    def _feature_index(self) -> int:
        """Index in ``hidden_states`` of the features IPCV restores (the last for a bare tower)."""
        layer = self._feature_layer
        return self._states - 1 if layer is None else layer % self._states

    @property
    def depth(self) -> int:
        """Blocks run: those up to the feature layer (all of a bare tower)."""
        return self._feature_index

    def example_inputs(
        self, image_size: ImageSize, batch: int, generator: torch.Generator
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``pixel_values`` [B, 3, H, W], asking for the feature layer as LLaVA does."""
        (pixels,), _ = super().example_inputs(image_size, batch, generator)
        if self._feature_layer is None:
            return (pixels,), {}
        return (pixels,), {"output_hidden_states": self._feature_index - self._states}

    def features(self, output: BaseModelOutputWithPooling) -> torch.Tensor:
        """The hidden states LLaVA's projector reads [images, N, D].

        ``last_hidden_state`` of a bare tower.
        """
        if self._feature_layer is None:
            return output.last_hidden_state
        return output.hidden_states[self._feature_index]

    def _embed_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Only the feature layer's hidden states exist in a compressed tower."""
        if self._feature_layer is None:
            return super()._embed_options(kwargs)
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
        return {}

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch + position embeddings, CLS, ``pre_layrnorm``."""
        return self.vision.pre_layrnorm(self.vision.embeddings(pixel_values))

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
        """The restored tokens as the dense tower returns them.

        A bare tower: ``last_hidden_state`` and the CLS ``pooler_output`` after
        ``post_layernorm``, as ``CLIPVisionModel``. LLaVA's tower: the restored tokens are the
        feature layer's hidden states; the other layers are ``None``, as transformers returns
        them when one layer is selected.
        """
        restored = self.images(full, enc)
        pooled = self.vision.post_layernorm(restored[:, 0, :])
        if self._feature_layer is None:
            return BaseModelOutputWithPooling(last_hidden_state=restored, pooler_output=pooled)
        states: list[torch.Tensor | None] = [None] * self._states
        states[self._feature_index] = restored
        return BaseModelOutputWithPooling(
            last_hidden_state=restored, pooler_output=pooled, hidden_states=tuple(states)
        )


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
    anyres = True
    image_unit = "tiles"

    @classmethod
    def image_tiles(cls, model: nn.Module, batch: Any) -> list[int]:
        """Base image + anyres crops of each image, from the processor's ``image_sizes``."""
        config = model.config
        return [
            image_size_to_num_patches(
                size.tolist(), config.image_grid_pinpoints, config.vision_config.image_size
            )
            for size in batch["image_sizes"]
        ]

    @classmethod
    def pack_image_embeds(
        cls, model: nn.Module, tiles: list[torch.Tensor], batch: Any
    ) -> list[torch.Tensor]:
        """The model's own packing (``pack_image_features``).

        The crops go into the image grid, unpadded, with ``image_newline`` after every row,
        after the base image.
        """
        inner = getattr(model, "model", model)
        packed, _ = inner.pack_image_features(
            tiles,
            batch["image_sizes"],
            vision_feature_select_strategy=inner.config.vision_feature_select_strategy,
            image_newline=inner.image_newline,
        )
        return list(packed)


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
