"""Build a TensorRT engine from an artifact's TensorRT flavour, with the ipcv plugins.

Written against the TensorRT Python API (``tensorrt``, imported lazily). TensorRT 10 builds
weakly typed networks: the requested fp16 / bf16 flag is set and layer norms, softmax,
reductions and the ipcv scoring plugins are pinned to fp32. TensorRT 11 builds strongly typed
networks only: the precision follows the exported graph (export with ``--dtype float16``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ipcv_deploy.artifact import Artifact
from ipcv_deploy.errors import ArtifactError, BackendUnavailableError, ConfigError
from ipcv_deploy.fileio import staged_directory, write_json
from ipcv_deploy.trt.check import check_model
from ipcv_deploy.trt.engine import (
    ENGINE_FILE,
    ENGINE_MANIFEST,
    PLUGIN_LIBRARY,
    TIMING_CACHE,
    BuildSettings,
    engine_key,
    profiles_of,
    read_engine_manifest,
    read_platform,
    rebuild_reason,
)

__all__ = [
    "build_engine",
    "gpu_sm",
    "import_tensorrt",
    "load_plugin_library",
    "require_plugin_library",
]

_DTYPE_OF_PRECISION = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
#: Plugins whose inputs an fp16 / bf16 engine keeps in fp32 (token scores, distances).
_FP32_PLUGINS = ("TokenSelect", "NeighborIndex")


def import_tensorrt() -> Any:
    """``import tensorrt`` with a clear error when it is absent."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError(
            "TensorRT is not installed: install the tensorrt Python package of your TensorRT "
            "release (NVIDIA's index, or JetPack's python3-libnvinfer on Jetson)"
        ) from None
    return tensorrt


def gpu_sm() -> str:
    """Compute capability of CUDA device 0, e.g. ``"9.0"``."""
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "no CUDA GPU visible; TensorRT engines build and run on a GPU"
        )
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"


def require_plugin_library(library: Path) -> None:
    """Raise ``BackendUnavailableError`` naming the build command if ``library`` is missing."""
    if not library.is_file():
        raise BackendUnavailableError(
            f"plugin library {library} not found; build it: cmake -S plugins -B build/plugins "
            "-DTensorRT_ROOT=<TensorRT> && cmake --build build/plugins (or pass --plugin)"
        )


def load_plugin_library(trt: Any, registry: Any, library: Path) -> Any:
    """Load ``libipcv_trt_plugins.so`` into a plugin registry.

    Raises:
        BackendUnavailableError: the library is missing or TensorRT refuses it.
    """
    require_plugin_library(library)
    handle = registry.load_library(str(library))
    if handle is None:
        raise BackendUnavailableError(
            f"TensorRT could not load {library} (built for another TensorRT or CUDA?); rebuild it"
        )
    return handle


def _pin_fp32(trt: Any, network: Any) -> int:
    """Weakly typed builds: keep numerically sensitive layers and ipcv scoring in fp32."""
    sensitive = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        plugin = layer.type == trt.LayerType.PLUGIN_V3 and any(
            p in layer.name for p in _FP32_PLUGINS
        )
        if layer.type in sensitive or plugin:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                if layer.get_output(j).dtype in (trt.float16, trt.bfloat16):
                    layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def build_engine(
    artifact: Artifact,
    settings: BuildSettings,
    plugin: Path,
    out: Path,
    force: bool = False,
    progress: Callable[[str], None] = lambda message: None,
) -> tuple[Path, bool]:
    """Build (or reuse) the engine of ``artifact`` in the engine directory ``out``.

    Returns:
        ``out`` and whether a cached engine was reused.

    Raises:
        BackendUnavailableError: TensorRT, a GPU or the plugin library is missing.
        ArtifactError: no TensorRT flavour, or the parser rejects the graph.
        ConfigError: a precision the graph cannot be built in (strongly typed TensorRT).
    """
    import onnx

    trt = import_tensorrt()
    require_plugin_library(plugin)
    key = engine_key(artifact, settings, plugin, read_platform(trt.__version__, gpu_sm()))
    reason = rebuild_reason(read_engine_manifest(out), key)
    if reason is None and not force:
        progress(f"reusing {out / ENGINE_FILE} (same TensorRT, GPU, graph, plugin and settings)")
        return out, True
    progress(f"building: {reason}")
    onnx_path = artifact.flavour_file("trt")
    report = check_model(onnx.load(str(onnx_path), load_external_data=False), settings.precision)
    if not report.passed:
        first = next(f for f in report.findings if f.severity == "error")
        raise ArtifactError(f"{onnx_path} fails the TensorRT check: {first.message}")
    weakly_typed = hasattr(trt.BuilderFlag, "FP16")
    if not weakly_typed and _DTYPE_OF_PRECISION[settings.precision] != artifact.manifest.dtype:
        raise ConfigError(
            f"TensorRT {trt.__version__} builds strongly typed networks, so the precision follows "
            f"the graph ({artifact.manifest.dtype}); export with --dtype "
            f"{_DTYPE_OF_PRECISION[settings.precision]} for a {settings.precision} engine"
        )
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    load_plugin_library(trt, builder.get_plugin_registry(), plugin)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    progress(f"parsing {onnx_path.name} ...")
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise ArtifactError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gb * 2**30))
    pinned = 0
    if weakly_typed and settings.precision != "fp32":
        config.set_flag(
            trt.BuilderFlag.FP16 if settings.precision == "fp16" else trt.BuilderFlag.BF16
        )
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = _pin_fp32(trt, network)
    source = artifact.manifest.inputs[0]
    profiles = profiles_of(artifact, settings)
    for profile_settings in profiles:
        # Dim 0 of pixel_values: the batch, or a native artifact's patch tokens per image
        # (image_grid_thw is a static [1, 3] and needs no range).
        profile = builder.create_optimization_profile()
        profile.set_shape(source.name, *profile_settings.shapes(source.shape))
        config.add_optimization_profile(profile)
    cache_path = out / TIMING_CACHE
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    progress(f"building a {settings.precision} engine (minutes) ...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ArtifactError(f"TensorRT failed to build {onnx_path}; rerun with a verbose logger")
    with staged_directory(out, force=True, marker=ENGINE_MANIFEST) as stage:
        (stage / ENGINE_FILE).write_bytes(bytes(serialized))
        (stage / TIMING_CACHE).write_bytes(bytes(config.get_timing_cache().serialize()))
        shutil.copy2(plugin, stage / PLUGIN_LIBRARY)
        write_json(
            stage / ENGINE_MANIFEST,
            {
                "key": key.to_dict(),
                "artifact": str(artifact.path.resolve()),
                "family": artifact.manifest.family,
                "inputs": [asdict(t) for t in artifact.manifest.inputs],
                "outputs": [asdict(t) for t in artifact.manifest.outputs],
                "native": artifact.manifest.native,
                "fp32_pinned_layers": pinned,
                "weakly_typed": weakly_typed,
            },
        )
    return out, False
