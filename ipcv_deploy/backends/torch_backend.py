"""The PyTorch backend: the row-form encoder that ``export`` traces, run eagerly."""

from __future__ import annotations

import torch
from torch import nn

from ipcv_deploy.compression import dense_encode, ipcv_encode_embedded
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.errors import ConfigError
from ipcv_deploy.models import FamilyAdapter, ImageSize, LoadedModel

__all__ = ["IMAGE_EMBEDS", "KEEP_IDX", "PIXEL_VALUES", "RowEncoder", "TorchBackend"]

PIXEL_VALUES = "pixel_values"
IMAGE_EMBEDS = "image_embeds"
KEEP_IDX = "keep_idx"


class RowEncoder(nn.Module):
    """Row-form pixels ``[B, ...]`` -> image embeddings ``[B, n, H]`` (+ kept indices).

    One image per row at a static ``image_size``; the batch is never read in Python, so the
    module exports with a dynamic batch. Dense when ``config`` is ``None``. The output is
    what the LLM consumes (the family's merger / projector output) when the full model is
    at hand, else the tower's features.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        config: IPCVConfig | None,
        image_size: ImageSize | None = None,
        return_indices: bool = False,
    ) -> None:
        super().__init__()
        self.adapter: FamilyAdapter = loaded.adapter(loaded.vision)
        self.image_size = tuple(image_size or loaded.image_size)
        self.context = self.adapter.row_context(self.image_size)
        if config is not None:
            if config.selection != "per_image":
                raise ConfigError(
                    f"selection {config.selection!r} spans the images of one call, but the row "
                    "form (export, run) holds one image per row and selects per image; drop "
                    "--selection (global selection runs in the eager apply_ipcv path)"
                )
            self.adapter.check_config(config, self.image_size)
            self.adapter.prepare(config, refresh=True)
        if return_indices and config is None:
            raise ConfigError(
                "a dense encoder keeps every token, so it has no kept indices to return; "
                "drop --return-indices or --dense"
            )
        self.config = config
        self.return_indices = return_indices
        self.vision = loaded.vision
        self.projector = self.adapter.projector(loaded.model) if loaded.model is not None else None

    @property
    def output_kind(self) -> str:
        """``llm_embeddings`` when the output is what the LLM consumes, else ``vision_features``."""
        if self.adapter.head_is_projector or self.projector is not None:
            return "llm_embeddings"
        return "vision_features"

    @property
    def output_names(self) -> tuple[str, ...]:
        """``image_embeds``, then ``keep_idx`` when asked for."""
        return (IMAGE_EMBEDS, KEEP_IDX) if self.return_indices else (IMAGE_EMBEDS,)

    def inputs(self, batch: int, seed: int = 0) -> torch.Tensor:
        """Seeded random pixels for ``batch`` images."""
        generator = torch.Generator().manual_seed(seed)
        return self.adapter.row_inputs(self.image_size, batch, generator)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Encode one image per row."""
        enc = self.adapter.embed_rows(pixels, self.context)
        if self.config is None:
            output, keep_idx = dense_encode(self.adapter, enc), None
        else:
            result = ipcv_encode_embedded(self.adapter, self.config, enc)
            output, keep_idx = result.output, result.state.keep_idx
        features = self.adapter.features(output)
        features = features.reshape(pixels.shape[0], -1, features.shape[-1])
        if self.projector is not None:
            features = self.projector(features)
        return (features, keep_idx) if self.return_indices else (features,)


class TorchBackend:
    """``RowEncoder`` behind the ``VisionBackend`` interface (no autograd).

    Pixels are moved to the tower's device and dtype; outputs stay on that device.
    """

    name = "torch"

    def __init__(self, encoder: RowEncoder) -> None:
        self.encoder = encoder.eval()
        self.output_names = encoder.output_names

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the encoder; outputs by name."""
        weight = next(self.encoder.vision.parameters())
        with torch.no_grad():
            outputs = self.encoder(pixels.to(weight.device, weight.dtype))
        return dict(zip(self.output_names, outputs, strict=True))
