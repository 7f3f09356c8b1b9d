"""The ONNX Runtime backend: the ``ort`` flavour of an artifact, CPU by default.

The ``ipcv`` nodes run through their model-local function bodies, so no custom-op library
is needed.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ipcv_deploy.artifact import Artifact
from ipcv_deploy.errors import BackendUnavailableError, InputError

__all__ = ["OrtBackend"]


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError(
            "onnxruntime is not installed; pip install 'ipcv-deploy[onnx]' (or onnxruntime)"
        ) from None
    return onnxruntime


class OrtBackend:
    """An ``onnxruntime.InferenceSession`` on an artifact, behind ``VisionBackend``.

    Args:
        artifact: a loaded artifact with the ``ort`` flavour.
        threads: intra-op threads (``None``: ONNX Runtime's default, all cores).
        providers: execution providers (default CPU).
        profile_prefix: turn on ONNX Runtime's profiler, writing JSON with this prefix.
        model: run this serialized ONNX model instead of the artifact's file (a copy with
            extra outputs); its external weights are read from the artifact directory.
    """

    name = "onnxruntime"

    def __init__(
        self,
        artifact: Artifact,
        threads: int | None = None,
        providers: list[str] | None = None,
        profile_prefix: str | None = None,
        model: bytes | None = None,
    ) -> None:
        ort = _onnxruntime()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        options.log_severity_level = 3
        if model is None:
            source: str | bytes = os.fspath(artifact.flavour_file("ort"))
        else:
            source = model
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", os.fspath(artifact.path)
            )
        self.artifact = artifact
        self.session = ort.InferenceSession(
            source, options, providers=providers or ["CPUExecutionProvider"]
        )
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self._input = artifact.manifest.inputs[0]

    def _check(self, pixels: torch.Tensor) -> None:
        want = self._input.shape[1:]
        if tuple(pixels.shape[1:]) != tuple(want):
            raise InputError(
                f"pixels {tuple(pixels.shape)} do not fit this artifact, which takes "
                f"[batch, {', '.join(map(str, want))}] ({self.artifact.manifest.image_size[0]}x"
                f"{self.artifact.manifest.image_size[1]} images); export again for another size"
            )

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the session on [B, ...] pixels; outputs by name as CPU tensors."""
        self._check(pixels)
        feed = np.ascontiguousarray(pixels.detach().cpu().numpy().astype(self._input.dtype))
        outputs = self.session.run(None, {self._input.name: feed})
        return {
            name: torch.from_numpy(value)
            for name, value in zip(self.output_names, outputs, strict=True)
        }

    def end_profiling(self) -> str:
        """Stop the profiler; returns the JSON file it wrote."""
        return self.session.end_profiling()
