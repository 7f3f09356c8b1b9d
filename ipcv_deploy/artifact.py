"""Export artifacts on disk: the manifest, file hashes, and atomic directory writes.

An artifact directory holds ``manifest.json``, the ONNX graph(s) and their external weights.
Loading checks the manifest's format and op set version and every file's size and stamp (a
cheap fingerprint; the full SHA-256 in ``verify`` / ``inspect``), so a truncated, swapped or
mismatched artifact is refused before any runtime sees it. Pure Python: no onnx import.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ipcv_deploy.errors import ArtifactError, ConfigError
from ipcv_deploy.fileio import sha256_of, stamp_of
from ipcv_deploy.ops import OPSET_VERSION

__all__ = [
    "ARTIFACT_FORMAT",
    "CHECKS",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "PACKAGE_NAME",
    "QUANTIZE_MODES",
    "Artifact",
    "FileEntry",
    "GenaiPackage",
    "Manifest",
    "TensorInfo",
    "check_files",
    "file_entry",
    "load_artifact",
    "load_genai_package",
]

ARTIFACT_FORMAT = "ipcv-deploy/vision-encoder"
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
FLAVOURS = ("ort", "trt")
#: How thoroughly ``load_artifact`` checks the files: sizes, sizes + stamps, full SHA-256.
CHECKS = ("size", "stamp", "full")
#: ``export --quantize`` values: float weights; dynamic int8 weights for ONNX Runtime after
#: the selection (``int8``) or everywhere (``int8-full``; see ``export/quantize.py``).
QUANTIZE_MODES = ("none", "int8", "int8-full")


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output: name, element type, shape (``"batch"`` for the dynamic axis)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorInfo:
        """Inverse of ``asdict``."""
        return cls(data["name"], data["dtype"], tuple(data["shape"]))


@dataclass(frozen=True)
class FileEntry:
    """Size, SHA-256 and stamp (``fileio.stamp_of``) of one file of the artifact."""

    bytes: int
    sha256: str
    stamp: str | None = None


@dataclass(frozen=True)
class Manifest:
    """What an artifact is; ``manifest.json`` is this, as JSON.

    Attributes:
        family: encoder family display name; ``model_type`` its Hugging Face type.
        source: where the weights came from: ``{"preset", "seed"}`` or ``{"path"}``.
        dtype: weight and I/O float type.
        image_size: the static (H, W) of every image.
        ipcv: the IPCV settings (``IPCVConfig.to_dict``), ``None`` for a dense export.
        tokens_per_image: encoder tokens per image (N); ``kept_per_image`` after selection.
        output_kind: ``llm_embeddings`` (projector output) or ``vision_features`` (tower only).
        encoder: depth, width and output width.
        flops_per_image: analytic FLOPs of the exported graph and of its dense counterpart.
        opsets: ONNX domain -> version (``""`` is the standard domain).
        flavours: flavour (``ort``: function bodies, ``trt``: plugin attributes) -> ONNX file.
        plugin: TensorRT plugin namespace and version the ``trt`` flavour names.
        inputs / outputs: graph I/O.
        files: every file of the artifact but the manifest -> size and hash.
        producer: package versions that wrote the artifact.
        quantization: how the weights were quantized (``export/quantize.py``), ``None`` for
            float weights.
        native: for a native-resolution export, the patch tokens per image it takes
            (``min_tokens`` / ``max_tokens``, and in pixels), ``patch_size``, ``merge_size``;
            ``image_size`` and the per-image counts are then those of the example size.
            ``None`` for a fixed-size export.
    """

    family: str
    model_type: str
    source: dict[str, Any]
    dtype: str
    image_size: tuple[int, int]
    ipcv: dict[str, Any] | None
    tokens_per_image: int
    kept_per_image: int
    output_kind: str
    encoder: dict[str, int]
    flops_per_image: dict[str, int]
    opsets: dict[str, int]
    flavours: dict[str, str]
    plugin: dict[str, str]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    files: dict[str, FileEntry]
    producer: dict[str, str]
    format: str = ARTIFACT_FORMAT
    manifest_version: int = MANIFEST_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    native: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: Path) -> Manifest:
        """Validate and build; ``where`` names the file in errors."""
        if not isinstance(data, dict) or data.get("format") != ARTIFACT_FORMAT:
            raise ArtifactError(
                f"{where} is not an ipcv-deploy vision-encoder manifest "
                f"(format {data.get('format') if isinstance(data, dict) else None!r}); "
                "export one with `ipcv-export export`"
            )
        if data.get("manifest_version", 0) > MANIFEST_VERSION:
            raise ArtifactError(
                f"{where} has manifest version {data['manifest_version']}, newer than the "
                f"{MANIFEST_VERSION} this ipcv-deploy reads; upgrade ipcv-deploy or re-export"
            )
        ipcv_opset = data.get("opsets", {}).get("ipcv", OPSET_VERSION)
        if ipcv_opset > OPSET_VERSION:
            raise ArtifactError(
                f"{where.parent} uses ipcv op set version {ipcv_opset}, but this ipcv-deploy "
                f"implements version {OPSET_VERSION}; upgrade ipcv-deploy or re-export the model"
            )
        names = {f.name for f in fields(cls)}
        optional = ("format", "extra", "quantization", "native")
        missing = sorted(n for n in names - set(data) if n not in optional)
        if missing or set(data) - names:
            raise ArtifactError(
                f"{where} is malformed (missing {missing}, unknown {sorted(set(data) - names)}); "
                "re-export the artifact"
            )
        try:
            return cls(
                **{
                    **data,
                    "image_size": tuple(data["image_size"]),
                    "inputs": tuple(TensorInfo.from_dict(t) for t in data["inputs"]),
                    "outputs": tuple(TensorInfo.from_dict(t) for t in data["outputs"]),
                    "files": {k: FileEntry(**v) for k, v in data["files"].items()},
                }
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise ArtifactError(f"{where} is malformed ({err}); re-export the artifact") from None


def file_entry(path: Path) -> FileEntry:
    """Size, hash and stamp of ``path`` for the manifest."""
    return FileEntry(path.stat().st_size, sha256_of(path), stamp_of(path))


@dataclass(frozen=True)
class Artifact:
    """A loaded, checked artifact directory."""

    path: Path
    manifest: Manifest

    def flavour_file(self, flavour: str) -> Path:
        """The ONNX file of ``flavour`` (``ort`` or ``trt``).

        Raises:
            ArtifactError: the artifact was exported without that flavour.
        """
        name = self.manifest.flavours.get(flavour)
        if name is None:
            raise ArtifactError(
                f"{self.path} has no {flavour!r} flavour (it has "
                f"{sorted(self.manifest.flavours)}); re-export with --target {flavour} or all"
            )
        return self.path / name


def check_files(root: Path, files: dict[str, FileEntry], check: str) -> None:
    """Check the files a manifest lists under ``root`` (``check`` as ``load_artifact``'s).

    Raises:
        ArtifactError: a file is missing, of another size, or does not match its stamp / hash.
    """
    for name, entry in files.items():
        file = root / name
        if not file.is_file():
            raise ArtifactError(f"{file} is missing; the artifact is incomplete, re-export it")
        size = file.stat().st_size
        if size != entry.bytes:
            raise ArtifactError(
                f"{file} has {size} bytes but the manifest says {entry.bytes}: the file is "
                "truncated or does not belong to this manifest; re-export the artifact"
            )
        full = check == "full" or (check == "stamp" and entry.stamp is None)
        if check == "stamp" and entry.stamp is not None and stamp_of(file) != entry.stamp:
            raise ArtifactError(
                f"{file} does not match the stamp in its manifest: it was replaced or "
                "modified; re-export the artifact"
            )
        if full and sha256_of(file) != entry.sha256:
            raise ArtifactError(
                f"{file} does not match the SHA-256 in its manifest: it was modified or "
                "corrupted; re-export the artifact"
            )


def load_artifact(path: str | os.PathLike[str], check: str = "stamp") -> Artifact:
    """Read and check an artifact directory.

    Args:
        path: the directory ``ipcv-export export`` wrote.
        check: ``size`` (sizes only), ``stamp`` (sizes and stamps: reads ~3 MiB a file, the
            default for loading to run) or ``full`` (every byte against its SHA-256).

    Raises:
        ArtifactError: missing, malformed, newer, truncated or modified artifact.
    """
    if check not in CHECKS:
        raise ConfigError(f"check must be one of {', '.join(CHECKS)}, got {check!r}")
    root = Path(path)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ArtifactError(
            f"{root} has no {MANIFEST_NAME}; pass a directory written by `ipcv-export export`"
        )
    try:
        data = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{manifest_path} is not valid JSON ({err}); re-export") from None
    manifest = Manifest.from_dict(data, manifest_path)
    check_files(root, manifest.files, check)
    for flavour, name in manifest.flavours.items():
        if flavour not in FLAVOURS or name not in manifest.files:
            raise ArtifactError(f"{manifest_path} lists flavour {flavour!r} -> {name!r} badly")
    return Artifact(root, manifest)


PACKAGE_NAME = "package.json"
PACKAGE_FORMAT = "ipcv-deploy/ort-genai"
PACKAGE_VERSION = 1


@dataclass(frozen=True)
class GenaiPackage:
    """A checked ONNX Runtime GenAI package (``export --format ort-genai``).

    ``package.json`` holds ``format``, ``version``, ``family``, ``model_type``, ``source``,
    ``vision`` (the folder of the vision artifact, itself checked by its manifest), ``llm``
    (``hidden_size``, ``num_hidden_layers``, ``vocab_size``), ``files`` (every other file:
    size, hash, stamp) and ``producer``.
    """

    path: Path
    data: dict[str, Any]
    vision: Artifact

    @property
    def source(self) -> dict[str, Any]:
        """Where the model came from: ``{"preset", "seed"}`` or ``{"path"}``."""
        return self.data["source"]


def load_genai_package(path: str | os.PathLike[str], check: str = "stamp") -> GenaiPackage:
    """Read and check an ONNX Runtime GenAI package directory.

    Raises:
        ArtifactError: not a package, malformed, newer, incomplete or modified, or its vision
            encoder does not fit its LLM.
    """
    root = Path(path)
    where = root / PACKAGE_NAME
    if not where.is_file():
        hint = (
            "it is a vision-encoder artifact; write a package with `ipcv-export export "
            "--format ort-genai`"
            if (root / MANIFEST_NAME).is_file()
            else "pass a directory written by `ipcv-export export --format ort-genai`"
        )
        raise ArtifactError(
            f"{root} is not an ONNX Runtime GenAI package (no {PACKAGE_NAME}): {hint}"
        )
    try:
        data = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{where} is not valid JSON ({err}); re-export the package") from None
    if not isinstance(data, dict) or data.get("format") != PACKAGE_FORMAT:
        raise ArtifactError(
            f"{where} is not an ipcv-deploy ONNX Runtime GenAI package; re-export it with "
            "`ipcv-export export --format ort-genai`"
        )
    if data.get("version", 0) > PACKAGE_VERSION:
        raise ArtifactError(
            f"{where} has package version {data['version']}, newer than the {PACKAGE_VERSION} "
            "this ipcv-deploy reads; upgrade ipcv-deploy or re-export"
        )
    required = ("family", "model_type", "source", "vision", "llm", "files")
    missing = [k for k in required if k not in data]
    if missing:
        raise ArtifactError(f"{where} is malformed (missing {missing}); re-export the package")
    try:
        files = {k: FileEntry(**v) for k, v in data["files"].items()}
    except TypeError as err:
        raise ArtifactError(f"{where} is malformed ({err}); re-export the package") from None
    check_files(root, files, check)
    vision = load_artifact(root / data["vision"], check)
    width = vision.manifest.outputs[0].shape[-1]
    if width != data["llm"]["hidden_size"]:
        raise ArtifactError(
            f"{root / data['vision']} gives {width}-wide image features but the package's LLM "
            f"is {data['llm']['hidden_size']} wide: the vision encoder belongs to another "
            "model; re-export the package"
        )
    return GenaiPackage(root, data, vision)
