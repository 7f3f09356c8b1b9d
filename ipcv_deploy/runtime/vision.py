"""The vision side of the runtime: a backend that turns row-form pixels into LLM embeddings.

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

__all__ = ["VISION_BACKENDS", "VisionEncoder", "artifact_vision", "torch_vision"]

VISION_BACKENDS = ("torch", "ort", "trt")


@dataclass(frozen=True)
class VisionEncoder:
    """A vision backend and what it does to each image.

    Attributes:
        backend: row-form pixels [B, ...] -> ``image_embeds`` [B, n, H] (LLM embeddings).
        image_size: the (H, W) every image is resized to.
        tokens_per_image: encoder tokens per image; ``kept_per_image`` inside the IPCV blocks.
        ipcv: the IPCV settings, ``None`` when dense.
    """

    backend: VisionBackend
    image_size: ImageSize
    tokens_per_image: int
    kept_per_image: int
    ipcv: dict[str, Any] | None

    @property
    def name(self) -> str:
        """The backend's name."""
        return self.backend.name


def torch_vision(
    loaded: LoadedModel, config: IPCVConfig | None, image_size: ImageSize | None = None
) -> VisionEncoder:
    """The PyTorch reference encoder (IPCV when ``config`` is given, else dense)."""
    if loaded.model is None:
        raise ConfigError(
            f"{loaded.name} is a vision tower without an LLM; `run` needs a full model"
        )
    encoder = RowEncoder(loaded, config, image_size)
    adapter = encoder.adapter
    tokens = adapter.encoder_shape(encoder.image_size).tokens
    kept = tokens if config is None else config.kept_count(tokens, adapter.num_prefix_tokens)
    return VisionEncoder(
        TorchBackend(encoder),
        encoder.image_size,
        tokens,
        kept,
        None if config is None else config.to_dict(),
    )


def _describe(source: dict[str, Any]) -> str:
    if "preset" in source:
        return f"preset {source['preset']} (seed {source['seed']})"
    return str(source.get("path"))


def _check_artifact_fits(artifact: Artifact, loaded: LoadedModel) -> None:
    """Refuse an artifact exported from another model than the LLM's."""
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
    _check_artifact_fits(artifact, loaded)
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
    return VisionEncoder(runner, tuple(m.image_size), m.tokens_per_image, m.kept_per_image, m.ipcv)
