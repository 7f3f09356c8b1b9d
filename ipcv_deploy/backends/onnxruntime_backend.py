"""The ONNX Runtime backend: an artifact on ONNX Runtime's CPU, CUDA or TensorRT provider.

``cpu`` (default) and ``cuda`` run the ``ort`` flavour: the ``ipcv`` nodes run through their
model-local function bodies, so no custom-op library is needed. ``tensorrt`` runs the ``trt``
flavour on ONNX Runtime's TensorRT execution provider, its ``ipcv`` nodes handed to our
plugin library (``libipcv_trt_plugins.so``), with the CUDA provider for whatever TensorRT
does not take. ``cuda`` / ``tensorrt`` need the ``onnxruntime-gpu`` build.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ipcv_deploy.artifact import Artifact
from ipcv_deploy.backends.torch_backend import join_images, split_images
from ipcv_deploy.errors import BackendUnavailableError, ConfigError, InputError
from ipcv_deploy.ops import DOMAIN

__all__ = [
    "ORT_PROVIDERS",
    "TRT_PLUGIN_DOMAIN",
    "OrtBackend",
    "execution_providers",
    "trt_plugin_model",
]

#: What ``--ort-provider`` takes, and the ONNX Runtime execution provider of each.
ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
#: The domain ONNX Runtime's TensorRT provider hands to TensorRT plugins (by op type).
TRT_PLUGIN_DOMAIN = "trt.plugins"


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError(
            "onnxruntime is not installed; pip install 'ipcv-deploy[onnx]' (or onnxruntime)"
        ) from None
    return onnxruntime


def execution_providers(
    provider: str, plugin_lib: Path | None = None, device_id: int = 0
) -> list[tuple[str, dict[str, str]]]:
    """The ``providers`` list (name, options) of an ``InferenceSession``, first choice first.

    ``cpu``: the CPU provider. ``cuda``: CUDA, then CPU. ``tensorrt``: TensorRT with
    ``trt_extra_plugin_lib_paths`` set to ``plugin_lib``, then CUDA, then CPU.

    Raises:
        ConfigError: an unknown provider, or ``tensorrt`` without ``plugin_lib``.
    """
    if provider not in ORT_PROVIDERS:
        raise ConfigError(
            f"unknown ONNX Runtime provider {provider!r}; choose one of {', '.join(ORT_PROVIDERS)}"
        )
    cpu = (ORT_PROVIDERS["cpu"], {})
    cuda = (ORT_PROVIDERS["cuda"], {"device_id": str(device_id)})
    if provider == "cpu":
        return [cpu]
    if provider == "cuda":
        return [cuda, cpu]
    if plugin_lib is None:
        raise ConfigError(
            "--ort-provider tensorrt runs the ipcv plugins: pass --plugin-lib "
            "libipcv_trt_plugins.so (built from plugins/)"
        )
    trt = {
        "device_id": str(device_id),
        "trt_extra_plugin_lib_paths": os.fspath(plugin_lib),
    }
    return [(ORT_PROVIDERS["tensorrt"], trt), cuda, cpu]


def _check_available(ort: Any, providers: list[tuple[str, dict[str, str]]], asked: str) -> None:
    """Refuse a provider the installed onnxruntime lacks, naming what to install."""
    wanted = providers[0][0]
    available = ort.get_available_providers()
    if wanted not in available:
        raise BackendUnavailableError(
            f"ONNX Runtime provider {asked!r} ({wanted}) is not in this onnxruntime "
            f"{ort.__version__} (it has {', '.join(available)}); pip uninstall onnxruntime && "
            "pip install onnxruntime-gpu (with CUDA, and TensorRT for 'tensorrt'), or pass "
            "--ort-provider cpu"
        )


def trt_plugin_model(artifact: Artifact) -> bytes:
    """The ``trt`` flavour, serialized, its ``ipcv`` nodes in ``TRT_PLUGIN_DOMAIN``.

    ONNX Runtime's TensorRT provider passes nodes of that domain to TensorRT, which finds the
    plugin by op type and the ``plugin_version`` / ``plugin_namespace`` attributes the
    flavour carries. Weights stay in the artifact's external data file.
    """
    import onnx

    model = onnx.load(os.fspath(artifact.flavour_file("trt")), load_external_data=False)
    for node in model.graph.node:
        if node.domain == DOMAIN:
            node.domain = TRT_PLUGIN_DOMAIN
    opsets = [o for o in model.opset_import if o.domain not in (DOMAIN, TRT_PLUGIN_DOMAIN)]
    del model.opset_import[:]
    model.opset_import.extend([*opsets, onnx.helper.make_opsetid(TRT_PLUGIN_DOMAIN, 1)])
    return model.SerializeToString()


class OrtBackend:
    """An ``onnxruntime.InferenceSession`` on an artifact, behind ``VisionBackend``.

    Args:
        artifact: a loaded artifact with the ``ort`` flavour.
        threads: intra-op threads (``None``: ONNX Runtime's default, all cores).
        provider: ``cpu`` (default), ``cuda`` or ``tensorrt`` (``execution_providers``).
        plugin_lib: ``libipcv_trt_plugins.so`` for the ``tensorrt`` provider.
        profile_prefix: turn on ONNX Runtime's profiler, writing JSON with this prefix.
        model: run this serialized ONNX model instead of the artifact's file (a copy with
            extra outputs); its external weights are read from the artifact directory.
    """

    name = "onnxruntime"

    def __init__(
        self,
        artifact: Artifact,
        threads: int | None = None,
        provider: str = "cpu",
        plugin_lib: Path | None = None,
        profile_prefix: str | None = None,
        model: bytes | None = None,
    ) -> None:
        ort = _onnxruntime()
        providers = execution_providers(provider, plugin_lib)
        _check_available(ort, providers, provider)
        if provider == "tensorrt":
            from ipcv_deploy.trt.builder import require_plugin_library

            require_plugin_library(Path(plugin_lib))
            model = model if model is not None else trt_plugin_model(artifact)
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
        self.session = ort.InferenceSession(source, options, providers=providers)
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self._input = artifact.manifest.inputs[0]
        self._native = artifact.manifest.native

    def _check(self, pixels: torch.Tensor) -> None:
        want = self._input.shape[1:]
        if tuple(pixels.shape[1:]) != tuple(want):
            raise InputError(
                f"pixels {tuple(pixels.shape)} do not fit this artifact, which takes "
                f"[batch, {', '.join(map(str, want))}] ({self.artifact.manifest.image_size[0]}x"
                f"{self.artifact.manifest.image_size[1]} images); export again for another size"
            )

    def _feed(self, pixels: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(pixels.detach().cpu().numpy().astype(self._input.dtype))

    def __call__(
        self, pixels: torch.Tensor, grid: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Run the session; outputs by name as CPU tensors.

        Fixed size: [B, ...] pixels. Native: the processor's pixels with their grid, one
        session run per image.
        """
        if self._native is None:
            self._check(pixels)
            outputs = self.session.run(None, {self._input.name: self._feed(pixels)})
            return {
                name: torch.from_numpy(value)
                for name, value in zip(self.output_names, outputs, strict=True)
            }
        if grid is None:
            raise InputError(
                f"{self.artifact.path} is a native-resolution export: pass image_grid_thw "
                "with the pixel_values"
            )
        grid_name = self.artifact.manifest.inputs[1].name
        parts = [
            tuple(
                torch.from_numpy(value)
                for value in self.session.run(
                    None,
                    {self._input.name: self._feed(p), grid_name: g.cpu().numpy().astype(np.int64)},
                )
            )
            for p, g in split_images(pixels, grid, self._native)
        ]
        return join_images(self.output_names, parts)

    def end_profiling(self) -> str:
        """Stop the profiler; returns the JSON file it wrote."""
        return self.session.end_profiling()
