"""The PyTorch backend: the row-form encoder that ``export`` traces, run eagerly."""

from __future__ import annotations

import torch
from torch import nn

from ipcv_deploy.compression import EncodedInput, dense_encode, ipcv_encode_embedded
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.errors import ConfigError, InputError
from ipcv_deploy.models import FamilyAdapter, ImageSize, LoadedModel

__all__ = [
    "IMAGE_EMBEDS",
    "IMAGE_GRID_THW",
    "KEEP_IDX",
    "PIXEL_VALUES",
    "RowEncoder",
    "TorchBackend",
    "join_images",
    "split_images",
]

PIXEL_VALUES = "pixel_values"
IMAGE_GRID_THW = "image_grid_thw"
IMAGE_EMBEDS = "image_embeds"
KEEP_IDX = "keep_idx"


class RowEncoder(nn.Module):
    """The exported encoder: pixels -> image embeddings (+ kept indices).

    Row form (fixed size): ``[B, ...]`` pixels, one image per row at a static
    ``image_size``, -> ``[B, n, H]``; the batch is never read in Python, so the module
    exports with a dynamic batch. Native form (``native``, Qwen families): the tower's own
    call, ``pixel_values [h*w, C*t*p*p]`` + ``image_grid_thw [1, 3]`` of one image at any
    grid, -> ``[h*w / 4, H]``; the token count is the dynamic dimension and ``image_size``
    only the size of the example inputs. Dense when ``config`` is ``None``. The output is
    what the LLM consumes (the family's merger / projector output) when the full model is
    at hand, else the tower's features.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        config: IPCVConfig | None,
        image_size: ImageSize | None = None,
        return_indices: bool = False,
        native: bool = False,
    ) -> None:
        super().__init__()
        self.adapter: FamilyAdapter = loaded.adapter(loaded.vision)
        self.image_size = tuple(image_size or loaded.image_size)
        if native and not self.adapter.native_resolution:
            raise ConfigError(
                f"{self.adapter.family} takes images of one size, not native resolution; "
                "pass --image-size HxW"
            )
        self.native = native
        self.context = None if native else self.adapter.row_context(self.image_size)
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
    def input_names(self) -> tuple[str, ...]:
        """``pixel_values``, and ``image_grid_thw`` in the native form."""
        return (PIXEL_VALUES, IMAGE_GRID_THW) if self.native else (PIXEL_VALUES,)

    @property
    def output_names(self) -> tuple[str, ...]:
        """``image_embeds``, then ``keep_idx`` when asked for."""
        return (IMAGE_EMBEDS, KEEP_IDX) if self.return_indices else (IMAGE_EMBEDS,)

    def inputs(
        self, batch: int, seed: int = 0, grid: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Seeded random inputs: ``batch`` images (row form) or one image of ``grid``.

        ``grid`` (patch rows, columns) defaults to ``image_size``'s; the native form holds
        one image per call, so ``batch`` must be 1 there.
        """
        generator = torch.Generator().manual_seed(seed)
        if not self.native:
            return (self.adapter.row_inputs(self.image_size, batch, generator),)
        if batch != 1:
            raise ConfigError(f"the native form takes one image per call, not {batch}")
        patch = int(self.vision.config.patch_size)
        grid = grid or (self.image_size[0] // patch, self.image_size[1] // patch)
        return self.adapter.native_inputs(grid, generator)

    def forward(
        self, pixels: torch.Tensor, grid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Encode one image per row (row form) or the one image of ``grid`` (native form)."""
        if self.native:
            enc = self.adapter.embed_native(pixels, grid)
        else:
            enc = self.adapter.embed_rows(pixels, self.context)
        return self._encode(enc, pixels)

    def encode_video(self, pixels: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Encode one video, ``grid`` [[t, h, w]] with t > 1 (native form, eager only).

        The frames go through the tower's own layout (``embed``: each temporal patch a
        segment, as the tower attends), so IPCV keeps ``floor(h * w * keep)`` per frame.
        """
        if not self.native:
            raise ConfigError("videos run through a native-resolution encoder, not the row form")
        return self._encode(self.adapter.embed(pixels, grid), pixels)

    def _encode(self, enc: EncodedInput, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Blocks (dense or IPCV), features and projector of embedded pixels."""
        if self.config is None:
            output, keep_idx = dense_encode(self.adapter, enc), None
        else:
            result = ipcv_encode_embedded(self.adapter, self.config, enc)
            output, keep_idx = result.output, result.state.keep_idx
        features = self.adapter.features(output)
        if not self.native:
            features = features.reshape(pixels.shape[0], -1, features.shape[-1])
        if self.projector is not None:
            features = self.projector(features)
        return (features, keep_idx) if self.return_indices else (features,)


def split_images(
    pixels: torch.Tensor,
    grid: torch.Tensor,
    native: dict[str, int] | None = None,
    videos: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A native-form call of several images -> one ``(pixel_values, image_grid_thw)`` each.

    The exported graph takes one image per call (as ONNX Runtime GenAI calls it when sizes
    differ); backends run the images one by one and concatenate the outputs. ``native`` (a
    manifest's entry) bounds each image's patches and sets the merge size. ``videos`` lets
    grids of several frames (t > 1) through, for the PyTorch backend.

    Raises:
        InputError: ``grid`` not ``[num_images, 3]``, a video grid (t > 1) unless ``videos``,
            a side not a multiple of the merge size, an image outside the artifact's range, or
            patch rows that do not add up to the grid.
    """
    if grid.ndim != 2 or grid.shape[-1] != 3 or grid.shape[0] < 1:
        raise InputError(
            f"image_grid_thw must be [num_images, 3] (t, h, w), got {tuple(grid.shape)}"
        )
    sizes = [int(t) * int(h) * int(w) for t, h, w in grid.tolist()]
    if not videos and any(int(t) != 1 for t in grid[:, 0].tolist()):
        raise InputError(
            f"image_grid_thw {grid.tolist()} holds a video (t > 1); the native export takes "
            "images: run videos through the PyTorch backend (--vision-backend torch)"
        )
    if native is not None:
        _check_grid(grid, native)
    if pixels.ndim != 2 or pixels.shape[0] != sum(sizes):
        raise InputError(
            f"pixel_values {tuple(pixels.shape)} do not match image_grid_thw {grid.tolist()} "
            f"({sum(sizes)} patch rows expected); pass the processor's pixel_values with its "
            "image_grid_thw"
        )
    return list(zip(pixels.split(sizes), grid.split(1), strict=True))


def _check_grid(grid: torch.Tensor, native: dict[str, int]) -> None:
    merge, patch = native["merge_size"], native["patch_size"]
    low, high = native["min_tokens"], native["max_tokens"]
    for _, h, w in grid.tolist():
        if h % merge or w % merge or h < 1 or w < 1:
            raise InputError(
                f"image grid {h}x{w} patches is not divisible by the merge size {merge}: "
                f"resize images to multiples of {patch * merge} px (the processor's "
                "smart_resize does)"
            )
        if not low <= h * w <= high:
            raise InputError(
                f"image grid {h}x{w} ({h * w} patches, {h * w * patch * patch} px) is outside "
                f"this artifact's {low}..{high} patches ({native['min_pixels']}.."
                f"{native['max_pixels']} px); set the processor's min_pixels / max_pixels "
                "inside it or export with --min-pixels / --max-pixels covering it"
            )


class TorchBackend:
    """``RowEncoder`` behind the ``VisionBackend`` interface (no autograd).

    Pixels are moved to the tower's device and dtype; outputs stay on that device. A
    native-form call of several images runs them one at a time (``split_images``), as the
    exported graph does; a video (t > 1) is one call of all its frames (``encode_video``).
    """

    name = "torch"

    def __init__(self, encoder: RowEncoder) -> None:
        self.encoder = encoder.eval()
        self.output_names = encoder.output_names

    def __call__(
        self, pixels: torch.Tensor, grid: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Run the encoder; outputs by name."""
        weight = next(self.encoder.vision.parameters())
        with torch.no_grad():
            if not self.encoder.native:
                outputs = self.encoder(pixels.to(weight.device, weight.dtype))
                return dict(zip(self.output_names, outputs, strict=True))
            if grid is None:
                raise InputError("a native-resolution encoder needs image_grid_thw with the pixels")
            parts = []
            for p, g in split_images(pixels, grid, videos=True):
                p, g = p.to(weight.device, weight.dtype), g.to(weight.device)
                video = int(g[0, 0]) > 1
                parts.append(self.encoder.encode_video(p, g) if video else self.encoder(p, g))
        return join_images(self.output_names, parts)


def join_images(
    names: tuple[str, ...], parts: list[tuple[torch.Tensor, ...]]
) -> dict[str, torch.Tensor]:
    """Outputs of per-image native calls as one call's.

    Embeddings stacked along tokens, kept indices ([1, P_i], in-image positions) side by side.
    """
    return {
        name: torch.cat([part[i] for part in parts], dim=0 if name == IMAGE_EMBEDS else -1)
        for i, name in enumerate(names)
    }
