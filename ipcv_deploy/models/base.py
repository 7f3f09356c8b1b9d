"""Base class of the per-family adapters and the registry that finds them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ipcv_deploy.compression import EncodedInput, TokenSet
from ipcv_deploy.compression.cost import EncoderShape
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.errors import ConfigError, InputError, UnsupportedModelError

__all__ = [
    "ADAPTERS",
    "FamilyAdapter",
    "FeatureProjector",
    "FixedImageAdapter",
    "ImageSize",
    "ImageTokens",
    "adapter_for_module",
    "get_adapter",
    "native_families",
    "register_adapter",
    "supported_model_types",
    "tiny_text_config",
]

ImageSize = tuple[int, int]
ADAPTERS: dict[str, type[FamilyAdapter]] = {}


class FamilyAdapter:
    """One vision-encoder family.

    Class-level facts serve the registry; an instance, bound to one vision tower, implements
    ``compression.EncoderAdapter``.
    """

    #: Display name, e.g. "Qwen2-VL".
    family: ClassVar[str]
    #: Hugging Face ``model_type`` values this adapter serves (full model and vision config).
    model_types: ClassVar[tuple[str, ...]]
    #: Class names of the transformers vision towers this adapter wraps.
    vision_class_names: ClassVar[tuple[str, ...]]
    num_prefix_tokens: ClassVar[int] = 0
    global_topk_spans_call: ClassVar[bool] = False
    #: True when the tower's head already yields the LLM's embeddings (a merger).
    head_is_projector: ClassVar[bool] = False
    #: True when the tower takes any image grid (Qwen): ``native_inputs`` / ``embed_native``.
    native_resolution: ClassVar[bool] = False
    #: The family processor's default (min_pixels, max_pixels) for native resolution.
    native_pixels: ClassVar[tuple[int, int] | None] = None
    #: True when the processor splits an image into tiles of the tower's size (InternVL's
    #: dynamic tiling): the runtime keeps that tiling unless one static size is asked for.
    dynamic_tiles: ClassVar[bool] = False
    #: True when the model packs an image's tiles into one grid for the LLM (anyres): the
    #: runtime always tiles at the tower's own size and ``pack_image_embeds`` packs them.
    anyres: ClassVar[bool] = False
    #: Added to the prefill positions transformers computes (models that count from 1).
    position_offset: ClassVar[int] = 0

    def __init__(self, vision: nn.Module) -> None:
        """Bind the adapter to a vision tower of this family."""
        self.vision = vision

    #: The paper's IPCV settings for this family.
    reference: ClassVar[IPCVConfig]
    #: The transformers class of the whole multimodal model (used to load checkpoints).
    full_model_class: ClassVar[type[nn.Module]]
    #: Attribute holding the tower in the full model's inner ``model`` (``visual``, ...).
    tower_attribute: ClassVar[str]

    @classmethod
    def reference_ipcv(cls) -> IPCVConfig:
        """The paper's IPCV settings for this family."""
        return cls.reference

    @classmethod
    def vision_tower(cls, model: nn.Module) -> nn.Module:
        """The vision tower inside a full model (or its inner ``model``) of this family."""
        inner = getattr(model, "model", model)
        return getattr(inner, cls.tower_attribute)

    # --- the LLM side of the runtime ----------------------------------------------------
    @classmethod
    def image_tiles(cls, model: nn.Module, batch: Any) -> list[int]:
        """Tiles of each image in a processed ``batch`` (``anyres`` families)."""
        raise NotImplementedError

    @classmethod
    def pack_image_embeds(
        cls, model: nn.Module, tiles: list[torch.Tensor], batch: Any
    ) -> list[torch.Tensor]:
        """Each image's LLM embeddings [tokens, H] from its tiles' [tiles, n, H], in order."""
        return [t.reshape(-1, t.shape[-1]) for t in tiles]

    @classmethod
    def prefix_blocks(cls, batch: Any) -> torch.Tensor | None:
        """[B, L] ids of the prompt spans attended both ways, ``None`` for a causal LLM.

        Equal ids >= 0 attend to each other; -1 is causal.
        """
        return None

    @classmethod
    def plain_prompt(cls, prompt: str, placeholder: str, images: int) -> str | None:
        """The prompt of a model that has no chat template, or ``None`` when it needs one."""
        return None

    # --- bound to a vision tower ---------------------------------------------------------
    @property
    def depth(self) -> int:
        """Number of transformer blocks."""
        raise NotImplementedError

    def check_image_size(self, image_size: ImageSize) -> None:
        """Raise ``InputError`` if the encoder cannot take images of ``image_size`` (H, W)."""
        raise NotImplementedError

    def example_inputs(
        self, image_size: ImageSize, batch: int, generator: torch.Generator
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Seeded random inputs of ``forward`` for ``batch`` images of ``image_size``."""
        raise NotImplementedError

    def encoder_shape(self, image_size: ImageSize) -> EncoderShape:
        """The encoder's FLOP-relevant shape at ``image_size``."""
        raise NotImplementedError

    def features(self, output: Any) -> torch.Tensor:
        """The tensor of the tower's output that the LLM side consumes."""
        raise NotImplementedError

    def embed(self, *args: Any, **kwargs: Any) -> EncodedInput:
        """Patch-embed the dense ``forward``'s inputs, packed in one row."""
        raise NotImplementedError

    # The row form (what is exported): one image per row, a static image size, dynamic batch.
    def row_context(self, image_size: ImageSize) -> Any:
        """Constants of the row form at ``image_size`` (positions), computed once per export."""
        raise NotImplementedError

    def row_inputs(
        self, image_size: ImageSize, batch: int, generator: torch.Generator
    ) -> torch.Tensor:
        """Seeded pixels of the row form, [B, ...]."""
        raise NotImplementedError

    def embed_rows(self, pixels: torch.Tensor, context: Any) -> EncodedInput:
        """Patch-embed row-form pixels [B, ...]: every row one image, the same segments."""
        raise NotImplementedError

    # The native form (``native_resolution`` families): one image per call, any grid.
    def native_inputs(self, grid: tuple[int, int], generator: torch.Generator) -> tuple[Any, ...]:
        """Seeded inputs of one image of ``grid`` (patch rows, columns) in the native form."""
        raise NotImplementedError

    def embed_native(self, *inputs: torch.Tensor) -> EncodedInput:
        """Patch-embed the native form's inputs: one image, one row."""
        raise NotImplementedError

    def block(
        self, index: int, x: torch.Tensor, enc: EncodedInput, tokens: TokenSet
    ) -> torch.Tensor:
        """Run block ``index`` on the tokens of ``tokens``."""
        raise NotImplementedError

    def stabilized_block(
        self, index: int, full: torch.Tensor, enc: EncodedInput, kept: TokenSet
    ) -> torch.Tensor:
        """AS block with queries for the kept rows only, keys/values over all rows."""
        raise NotImplementedError

    def head(self, full: torch.Tensor, enc: EncodedInput) -> Any:
        """Final norm / merger; returns the dense ``forward``'s output type."""
        raise NotImplementedError

    def prepare(self, config: IPCVConfig, refresh: bool = False) -> None:
        """Precompute what the blocks of ``config`` need from the weights, before tracing.

        Kept until ``release``; ``refresh`` recomputes what exists.
        """

    def release(self) -> None:
        """Drop what ``prepare`` made."""

    def check_config(self, config: IPCVConfig, image_size: ImageSize) -> int:
        """Check that ``config`` fits this encoder at ``image_size``; returns kept per image.

        Raises:
            ConfigError: K or the AS window past the depth, or more neighbours than kept tokens.
            InputError: an image size the encoder cannot take.
        """
        config.check_depth(self.depth)
        kept = config.kept_count(self.encoder_shape(image_size).tokens, self.num_prefix_tokens)
        config.check_neighbors(kept)
        return kept

    def projector(self, model: nn.Module) -> nn.Module | None:
        """The module that maps row-form ``features`` [B, n, D] to the LLM's embeddings.

        ``None`` where the tower's own head already is the projector (a merger), or where
        ``model`` is a tower without its multimodal model.
        """
        return None

    # --- shared helpers -------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype of the tower."""
        return next(self.vision.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Device of the tower's parameters (where example inputs are made)."""
        return next(self.vision.parameters()).device

    def _random(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Seeded on the generator's device (the CPU: the same values everywhere), then moved."""
        values = torch.randn(shape, generator=generator, device=generator.device)
        return values.to(self.device, self.dtype)


@dataclass(frozen=True)
class ImageTokens:
    """Context of a fixed-size tower's input: tokens per image (prefix tokens included)."""

    tokens: int


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


class FixedImageAdapter(FamilyAdapter):
    """A tower taking ``pixel_values`` [images, C, H, W] of one size (``config.image_size``).

    Owns what the CLIP, SigLIP and InternViT adapters share: the size check, seeded inputs,
    the encoder shape, embedding into rows (all images packed in one row for the eager path,
    one image per row for the row form), the context (``ImageTokens``) and the projector
    lookup. Subclasses supply ``_embed``, the blocks and the head.
    """

    #: What one image is called in messages ("images", "tiles").
    image_unit: ClassVar[str] = "images"
    #: Appended to the wrong-size message.
    size_hint: ClassVar[str] = ""

    @property
    def fixed_image_size(self) -> ImageSize:
        """The one (H, W) the tower takes."""
        return _pair(self.vision.config.image_size)

    def check_image_size(self, image_size: ImageSize) -> None:
        """Only ``fixed_image_size`` fits."""
        h, w = self.fixed_image_size
        if tuple(image_size) != (h, w):
            raise InputError(
                f"image size {image_size[0]}x{image_size[1]} does not fit {self.family}: the "
                f"encoder takes {h}x{w} {self.image_unit}; pass --image-size {h}x{w}"
                f"{self.size_hint}"
            )

    def example_inputs(
        self, image_size: ImageSize, batch: int, generator: torch.Generator
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``pixel_values`` [B, C, H, W]."""
        self.check_image_size(image_size)
        channels = self.vision.config.num_channels
        return (self._random((batch, channels, *image_size), generator),), {}

    def encoder_shape(self, image_size: ImageSize) -> EncoderShape:
        """Blocks and patch embedding at ``image_size`` (prefix tokens included)."""
        self.check_image_size(image_size)
        cfg = self.vision.config
        ph, pw = _pair(cfg.patch_size)
        patches = (image_size[0] // ph) * (image_size[1] // pw)
        return EncoderShape(
            depth=self.depth,
            width=cfg.hidden_size,
            mlp_hidden=cfg.intermediate_size,
            mlp_matrices=2,
            tokens=patches + self.num_prefix_tokens,
            num_prefix=self.num_prefix_tokens,
            embed_flops=2 * patches * cfg.num_channels * ph * pw * cfg.hidden_size,
            head_flops=0,
        )

    def _embed(self, pixel_values: torch.Tensor, **options: Any) -> torch.Tensor:
        """Patch (+ CLS, position) embeddings of [images, C, H, W] as [images, N, D]."""
        raise NotImplementedError

    def _embed_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Check the dense ``forward``'s keyword arguments; returns those ``_embed`` takes."""
        reject_layer_outputs(kwargs, self.depth)
        return {}

    def _embed_checked(self, pixel_values: torch.Tensor, **options: Any) -> torch.Tensor:
        if pixel_values.ndim != 4:
            raise InputError(
                f"pixel_values must be [{self.image_unit}, channels, height, width], "
                f"got {tuple(pixel_values.shape)}"
            )
        return self._embed(pixel_values, **options)

    def embed(self, pixel_values: torch.Tensor, **kwargs: Any) -> EncodedInput:
        """Embeddings of the dense ``forward``'s input; the images packed in one row."""
        emb = self._embed_checked(pixel_values, **self._embed_options(kwargs))
        images, tokens, width = emb.shape
        return EncodedInput(
            emb.reshape(1, images * tokens, width), (tokens,) * images, ImageTokens(tokens)
        )

    def row_context(self, image_size: ImageSize) -> None:
        """Nothing to precompute: position embeddings are part of the weights."""
        self.check_image_size(image_size)

    def row_inputs(
        self, image_size: ImageSize, batch: int, generator: torch.Generator
    ) -> torch.Tensor:
        """``pixel_values`` [B, C, H, W], one image per row."""
        (pixels,), _ = self.example_inputs(image_size, batch, generator)
        return pixels

    def embed_rows(self, pixels: torch.Tensor, context: Any) -> EncodedInput:
        """Embed [B, C, H, W]: one image per row, one segment."""
        emb = self._embed_checked(pixels)
        return EncodedInput(emb, (emb.shape[1],), ImageTokens(emb.shape[1]))

    @staticmethod
    def images(full: torch.Tensor, enc: EncodedInput) -> torch.Tensor:
        """Rows of packed tokens [B, T, D] as [images, N, D]."""
        tokens: ImageTokens = enc.context
        return full.reshape(-1, tokens.tokens, full.shape[-1])

    def projector(self, model: nn.Module) -> nn.Module | None:
        """The multimodal model's path from tower features to LLM embeddings.

        ``None`` for a tower without its multimodal model.
        """
        inner = getattr(model, "model", model)
        if not hasattr(inner, "multi_modal_projector"):
            return None
        return self._projector(inner)

    def _projector(self, inner: nn.Module) -> nn.Module:
        return FeatureProjector(inner)


class FeatureProjector(nn.Module):
    """``get_image_features`` after the tower: [B, prefix + n, D] -> LLM embeddings.

    Drops the CLS token where the model's ``vision_feature_select_strategy`` is ``default``,
    rearranges (``rearrange``; identity here) and applies ``multi_modal_projector``.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        strategy = getattr(inner.config, "vision_feature_select_strategy", None)
        self.drop_cls = strategy == "default"
        self.multi_modal_projector = inner.multi_modal_projector

    def rearrange(self, features: torch.Tensor) -> torch.Tensor:
        """Family-specific reshaping between CLS drop and projector."""
        return features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """CLS drop, ``rearrange``, projector."""
        if self.drop_cls:
            features = features[:, 1:]
        return self.multi_modal_projector(self.rearrange(features))


def tiny_text_config(model_type: str, **extra: Any) -> dict[str, Any]:
    """The 4-layer LLM (vocab 320, width 96) of the tiny presets, as a transformers config dict."""
    return {
        "model_type": model_type,
        "vocab_size": 320,
        "hidden_size": 96,
        "intermediate_size": 192,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **extra,
    }


def reject_layer_outputs(kwargs: dict[str, Any], depth: int) -> None:
    """Refuse requests for per-layer hidden states or attentions, which IPCV cannot give.

    ``output_hidden_states`` naming only the last block (-1, as InternVL's
    ``get_image_features`` passes it) is accepted: ``last_hidden_state`` serves it.
    """
    wanted = kwargs.get("output_hidden_states")
    if wanted not in (None, False, -1, depth, [-1]):
        raise ConfigError(
            f"output_hidden_states={wanted!r} asks for per-block hidden states, which an "
            "IPCV-compressed encoder does not have (pruned tokens are rebuilt only at the end); "
            "use last_hidden_state / the merger output, or remove_ipcv() to inspect blocks"
        )
    if kwargs.get("output_attentions"):
        raise ConfigError(
            "output_attentions is not available from an IPCV-compressed encoder; "
            "use remove_ipcv() to get dense attention maps"
        )


def check_multiple(image_size: ImageSize, multiple: int, family: str) -> None:
    """Raise ``InputError`` unless both sides are positive multiples of ``multiple``."""
    height, width = image_size
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise InputError(
            f"image size {height}x{width} does not fit {family}: both sides must be positive "
            f"multiples of patch x merge = {multiple}; use e.g. {multiple * 16}x{multiple * 16}"
        )


def register_adapter(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Class decorator: make ``cls`` findable by each of its ``model_types``.

    Raises:
        ValueError: if a model type is already registered.
    """
    for model_type in cls.model_types:
        if model_type in ADAPTERS:
            raise ValueError(
                f"model_type {model_type!r} is already served by {ADAPTERS[model_type]}"
            )
        ADAPTERS[model_type] = cls
    return cls


def _families() -> str:
    seen = dict.fromkeys(f"{a.family} ({', '.join(a.model_types)})" for a in ADAPTERS.values())
    return "; ".join(sorted(seen))


def native_families() -> str:
    """Display names of the native-resolution families, e.g. ``"Qwen2-VL / Qwen2.5-VL"``."""
    names = dict.fromkeys(a.family for a in ADAPTERS.values() if a.native_resolution)
    return " / ".join(names)


def supported_model_types() -> list[str]:
    """Every registered Hugging Face ``model_type``."""
    return sorted(ADAPTERS)


def get_adapter(model_type: str) -> type[FamilyAdapter]:
    """The adapter class serving ``model_type``.

    Raises:
        UnsupportedModelError: listing the supported families.
    """
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {_families()}"
        ) from None


def adapter_for_module(module: nn.Module) -> tuple[type[FamilyAdapter], nn.Module]:
    """Find the adapter for a vision tower or a full multimodal model.

    Returns:
        The adapter class and the vision tower (``module`` itself, or the tower inside it).

    Raises:
        UnsupportedModelError: if no registered family serves ``module``.
    """
    name = type(module).__name__
    for adapter in dict.fromkeys(ADAPTERS.values()):
        if name in adapter.vision_class_names:
            return adapter, module
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    if model_type in ADAPTERS:
        adapter = ADAPTERS[model_type]
        return adapter, adapter.vision_tower(module)
    raise UnsupportedModelError(
        f"{name} is not a supported vision tower or multimodal model; supported: {_families()}"
    )
