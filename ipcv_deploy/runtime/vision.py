"""The vision side of the runtime: a backend that turns pixels into LLM embeddings.

Qwen families run at native resolution (the processor's own ``smart_resize`` grid per image,
``pixel_values`` + ``image_grid_thw`` as the tower takes them) unless a fixed size is asked
for or the artifact is a fixed-size export; the other families take their fixed-size tiles.

``torch`` runs the PyTorch reference (``backends.RowEncoder``: IPCV or dense) on the loaded
model's tower; ``ort`` and ``trt`` run an exported artifact (ONNX Runtime, or the TensorRT
engine built from it), after checking that the artifact was made from the same model as the
LLM it feeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipcv_deploy.artifact import Artifact, load_artifact
from ipcv_deploy.backends import RowEncoder, TorchBackend, VisionBackend
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.errors import ArtifactError, ConfigError
from ipcv_deploy.models import ImageSize, LoadedModel

__all__ = [
    "VISION_BACKENDS",
    "VisionEncoder",
    "artifact_vision",
    "check_artifact_fits",
    "torch_vision",
]

VISION_BACKENDS = ("torch", "ort", "trt")


@dataclass(frozen=True)
class VisionEncoder:
    """A vision backend and what it does to each image.

    Attributes:
        backend: row-form pixels [B, ...] -> ``image_embeds`` [B, n, H] (LLM embeddings);
            native: the processor's ``pixel_values`` + ``image_grid_thw`` -> [sum n_i, H].
        image_size: the (H, W) every image is resized to (native: the example size).
        tokens_per_image: encoder tokens per image; ``kept_per_image`` inside the IPCV blocks
            (native: at the example size; a run reports each call's own).
        ipcv: the IPCV settings, ``None`` when dense.
        native: images keep their own size: the processor's ``smart_resize`` decides the
            grid (Qwen), inside ``pixel_range`` when the encoder has one.
        pixel_range: (min, max) pixels a native artifact takes, ``None`` for any.
        tiles: the processor splits each image into tiles of ``image_size`` as the model
            does (InternVL's dynamic tiling); the counts above are per tile.
    """

    backend: VisionBackend
    image_size: ImageSize
    tokens_per_image: int
    kept_per_image: int
    ipcv: dict[str, Any] | None
    native: bool = False
    pixel_range: tuple[int, int] | None = None
    tiles: bool = False

    @property
    def name(self) -> str:
        """The backend's name."""
        return self.backend.name


def torch_vision(
    loaded: LoadedModel, config: IPCVConfig | None, image_size: ImageSize | None = None
) -> VisionEncoder:
    """The PyTorch reference encoder (IPCV when ``config`` is given, else dense).

    Qwen families run at native resolution and InternVL on its processor's dynamic tiles,
    unless ``image_size`` fixes one size; LLaVA-NeXT always on its anyres tiles.

    Raises:
        ConfigError: a tower without an LLM, or an ``image_size`` for an anyres model.
    """
    if loaded.model is None:
        raise ConfigError(
            f"{loaded.name} is a vision tower without an LLM; `run` needs a full model"
        )
    anyres = loaded.adapter.anyres
    if anyres and image_size is not None:
        raise ConfigError(
            f"{loaded.adapter.family} packs its anyres tiles of the tower's size for the LLM, "
            "so images keep their own size; drop --image-size"
        )
    native = image_size is None and loaded.adapter.native_resolution
    encoder = RowEncoder(loaded, config, image_size, native=native)
    adapter = encoder.adapter
    tokens = adapter.encoder_shape(encoder.image_size).tokens
    kept = tokens if config is None else config.kept_count(tokens, adapter.num_prefix_tokens)
    return VisionEncoder(
        TorchBackend(encoder),
        encoder.image_size,
        tokens,
        kept,
        None if config is None else config.to_dict(),
        native=native,
        tiles=anyres or (image_size is None and loaded.adapter.dynamic_tiles),
    )


def _describe(source: dict[str, Any]) -> str:
    if "preset" in source:
        return f"preset {source['preset']} (seed {source['seed']})"
    return str(source.get("path"))


def check_artifact_fits(artifact: Artifact, loaded: LoadedModel) -> None:
    """Refuse an artifact exported from another model than the LLM's.

    Raises:
        ArtifactError: another family, tower features instead of LLM embeddings, another
            width, or another source model, each named.
    """
    m = artifact.manifest
    adapter = loaded.adapter
    problems = []
    if m.model_type not in adapter.model_types:
        problems.append(f"it is a {m.family} encoder, the LLM is {adapter.family}")
    if m.output_kind != "llm_embeddings":
        problems.append("it outputs tower features, not LLM embeddings (export the full model)")
    width = loaded.model.get_input_embeddings().embedding_dim if loaded.model else None
    if m.outputs and m.outputs[0].shape[-1] != width:
        problems.append(f"its embeddings are {m.outputs[0].shape[-1]} wide, the LLM takes {width}")
    here = (
        {"preset": loaded.name, "seed": loaded.seed}
        if loaded.seed is not None
        else {"path": str(Path(loaded.name).resolve())}
    )
    if m.source != here:
        problems.append(f"it was exported from {_describe(m.source)}, the LLM is {_describe(here)}")
    if problems:
        raise ArtifactError(
            f"{artifact.path} does not belong to this model: {'; '.join(problems)}; export it "
            f"from the same model with `ipcv-export export --model {loaded.name}`"
        )


def artifact_vision(
    loaded: LoadedModel,
    artifact_dir: Path,
    backend: str,
    threads: int | None = None,
    engine_dir: Path | None = None,
    ort_provider: str = "cpu",
    plugin_lib: Path | None = None,
) -> VisionEncoder:
    """An exported encoder on ONNX Runtime (``ort``) or TensorRT (``trt``).

    Args:
        loaded: the model whose LLM the embeddings feed (checked against the manifest).
        artifact_dir: directory written by ``ipcv-export export``.
        backend: ``ort`` or ``trt``.
        threads: ONNX Runtime intra-op threads.
        engine_dir: the TensorRT engine directory (default ``artifact_dir/trt-fp16``).
        ort_provider: ONNX Runtime's execution provider: ``cpu``, ``cuda`` or ``tensorrt``.
        plugin_lib: the plugin library for ``ort_provider="tensorrt"``.
    """
    artifact = load_artifact(artifact_dir)
    check_artifact_fits(artifact, loaded)
    m = artifact.manifest
    if backend == "ort":
        from ipcv_deploy.backends.onnxruntime_backend import OrtBackend

        runner: VisionBackend = OrtBackend(
            artifact, threads=threads, provider=ort_provider, plugin_lib=plugin_lib
        )
    elif backend == "trt":
        from ipcv_deploy.trt.runner import TrtBackend

        engine = engine_dir or artifact_dir / "trt-fp16"
        if not engine.is_dir():
            raise ArtifactError(
                f"no TensorRT engine at {engine}; build it with `ipcv-export build {artifact_dir}`"
            )
        runner = TrtBackend(engine)
    else:
        raise ConfigError(
            f"unknown vision backend {backend!r}; choose one of {', '.join(VISION_BACKENDS)}"
        )
    pixel_range = (m.native["min_pixels"], m.native["max_pixels"]) if m.native else None
    return VisionEncoder(
        runner,
        tuple(m.image_size),
        m.tokens_per_image,
        m.kept_per_image,
        m.ipcv,
        native=m.native is not None,
        pixel_range=pixel_range,
        # the artifact takes any number of its tiles
        tiles=loaded.adapter.dynamic_tiles or loaded.adapter.anyres,
    )
