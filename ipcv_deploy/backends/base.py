"""The interface every vision backend implements."""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["VisionBackend"]


class VisionBackend(Protocol):
    """A compiled or eager vision encoder in row form."""

    #: Short backend name for reports ("torch", "onnxruntime", "tensorrt").
    name: str
    #: Output names, in order (``image_embeds`` first, then ``keep_idx`` when exported).
    output_names: tuple[str, ...]

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run on [B, ...] pixels (any device); every output by name, on the backend's device.

        torch: the tower's device; ONNX Runtime: the CPU; TensorRT: the CUDA device.
        """
        ...
