"""Engine directories: build settings, profiles, the engine manifest and the cache rule.

The cache rule decides when a built engine may be reused. Pure Python (no TensorRT).
"""

from __future__ import annotations

import ctypes
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ipcv_deploy.artifact import Artifact
from ipcv_deploy.errors import ArtifactError, ConfigError
from ipcv_deploy.fileio import sha256_of

__all__ = [
    "ENGINE_FILE",
    "ENGINE_MANIFEST",
    "PLUGIN_LIBRARY",
    "PRECISIONS",
    "BuildSettings",
    "EngineKey",
    "Platform",
    "Profile",
    "check_profiles",
    "default_profiles",
    "engine_key",
    "profiles_of",
    "read_engine_manifest",
    "read_platform",
    "rebuild_reason",
]

ENGINE_FILE = "vision.engine"
ENGINE_MANIFEST = "engine.json"
PLUGIN_LIBRARY = "libipcv_trt_plugins.so"
TIMING_CACHE = "timing.cache"
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Profile:
    """One optimization profile over dim 0 of ``pixel_values``: min <= opt <= max.

    Dim 0 is the batch (images / tiles per call) of a fixed-size artifact, and the patch
    tokens of the one image per call of a native-resolution artifact (Edge-LLM's
    ``--minImageTokens`` / ``--maxImageTokens``).
    """

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ConfigError(
                f"profile needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}"
            )

    @classmethod
    def parse(cls, text: str) -> Profile:
        """``"1:4:8"`` (min:opt:max) or ``"4"`` (1:4:4)."""
        try:
            parts = [int(p) for p in text.split(":")]
        except ValueError:
            parts = []
        if len(parts) == 1:
            return cls(1, parts[0], parts[0])
        if len(parts) != 3:
            raise ConfigError(f"profile must look like 1:4:8 (min:opt:max), got {text!r}")
        return cls(*parts)

    def shapes(self, input_shape: tuple[int | str, ...]) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) input shapes: the manifest's shape with each dim-0 size."""
        rest = tuple(int(d) for d in input_shape[1:])
        return tuple((b, *rest) for b in (self.min, self.opt, self.max))

    def fits(self, size: int) -> bool:
        """Whether a call with dim 0 of ``size`` runs in this profile."""
        return self.min <= size <= self.max


def default_profiles(native: dict[str, int] | None, example_tokens: int) -> tuple[Profile, ...]:
    """The profiles a build uses unless told: batch 1:1:4 for a fixed size.

    Native: the artifact's whole token range, tuned at the example size's tokens (clamped).
    """
    if native is None:
        return (Profile(1, 1, 4),)
    low, high = native["min_tokens"], native["max_tokens"]
    return (Profile(low, min(max(example_tokens, low), high), high),)


def check_profiles(profiles: tuple[Profile, ...], native: dict[str, int] | None) -> None:
    """Native artifacts: every profile inside the token range, in whole merge units.

    Raises:
        ConfigError: naming the allowed range.
    """
    if native is None:
        return
    unit = native["merge_size"] ** 2
    low, high = native["min_tokens"], native["max_tokens"]
    for p in profiles:
        if p.min < low or p.max > high or any(v % unit for v in (p.min, p.opt, p.max)):
            raise ConfigError(
                f"profile {p.min}:{p.opt}:{p.max} is in image tokens (patches per image) for "
                f"this native-resolution artifact: each value a multiple of {unit} within "
                f"{low}..{high}; e.g. --profile {low}:{min(max(1024, low), high)}:{high}"
            )


@dataclass(frozen=True)
class BuildSettings:
    """What the user asks of a build."""

    precision: str = "fp16"
    #: ``None``: ``default_profiles`` of the artifact.
    profiles: tuple[Profile, ...] | None = None
    workspace_gb: float = 4.0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.profiles is not None and not self.profiles:
            raise ConfigError("at least one optimization profile is needed")


@dataclass(frozen=True)
class Platform:
    """The machine an engine is built on: what TensorRT engines are not portable across.

    Attributes:
        tensorrt_version: TensorRT's version.
        gpu_sm: compute capability of the GPU, e.g. ``"8.7"``.
        cuda_driver: the CUDA version the driver supports (``cuDriverGetVersion``), e.g.
            ``"12.6"``; ``None`` where no CUDA driver is loaded.
        nvidia_driver: the kernel driver's version (``/proc/driver/nvidia/version``), ``None``
            where absent (Jetson).
        l4t_release: the Jetson Linux (JetPack) release (``/etc/nv_tegra_release``), e.g.
            ``"R36.4.3"``; ``None`` off Jetson.
    """

    tensorrt_version: str
    gpu_sm: str
    cuda_driver: str | None = None
    nvidia_driver: str | None = None
    l4t_release: str | None = None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def parse_l4t_release(text: str) -> str | None:
    """``# R36 (release), REVISION: 4.3, ...`` -> ``"R36.4.3"``."""
    found = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"R{found[1]}.{found[2]}" if found else None


def parse_nvidia_driver(text: str) -> str | None:
    """``NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  ...`` -> ``"550.54.14"``."""
    found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", text)
    return found[1] if found else None


def _cuda_driver_version() -> str | None:
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def read_platform(tensorrt_version: str, gpu_sm: str, root: Path = Path("/")) -> Platform:
    """This machine's ``Platform`` (``root`` is where ``/proc`` and ``/etc`` are read)."""
    driver = _read(root / "proc/driver/nvidia/version")
    tegra = _read(root / "etc/nv_tegra_release")
    return Platform(
        tensorrt_version=tensorrt_version,
        gpu_sm=gpu_sm,
        cuda_driver=_cuda_driver_version(),
        nvidia_driver=parse_nvidia_driver(driver) if driver else None,
        l4t_release=parse_l4t_release(tegra) if tegra else None,
    )


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on: change any one and the engine must be rebuilt.

    Engines are not portable across TensorRT versions, GPUs (SM), CUDA drivers or JetPack
    releases, and depend on the exact graph, weights, plugin library, precision and profiles.
    """

    tensorrt_version: str
    gpu_sm: str
    cuda_driver: str | None
    nvidia_driver: str | None
    l4t_release: str | None
    precision: str
    profiles: tuple[tuple[int, int, int], ...]
    onnx_sha256: str
    weights_sha256: str
    plugin_sha256: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def profiles_of(artifact: Artifact, settings: BuildSettings) -> tuple[Profile, ...]:
    """The settings' profiles, or the artifact's defaults; checked against a native range."""
    manifest = artifact.manifest
    profiles = settings.profiles or default_profiles(manifest.native, manifest.tokens_per_image)
    check_profiles(profiles, manifest.native)
    return profiles


def engine_key(
    artifact: Artifact, settings: BuildSettings, plugin: Path, platform: Platform
) -> EngineKey:
    """The key of building ``artifact``'s TensorRT flavour with ``settings`` here."""
    onnx_name = artifact.manifest.flavours.get("trt")
    if onnx_name is None:
        raise ArtifactError(
            f"{artifact.path} has no TensorRT flavour; re-export with --target trt or --target all"
        )
    weights = [n for n in artifact.manifest.files if n.endswith(".data")]
    return EngineKey(
        tensorrt_version=platform.tensorrt_version,
        gpu_sm=platform.gpu_sm,
        cuda_driver=platform.cuda_driver,
        nvidia_driver=platform.nvidia_driver,
        l4t_release=platform.l4t_release,
        precision=settings.precision,
        profiles=tuple((p.min, p.opt, p.max) for p in profiles_of(artifact, settings)),
        onnx_sha256=artifact.manifest.files[onnx_name].sha256,
        weights_sha256=artifact.manifest.files[weights[0]].sha256 if weights else "",
        plugin_sha256=sha256_of(plugin),
    )


def read_engine_manifest(engine_dir: Path) -> dict[str, Any] | None:
    """The engine directory's manifest, or ``None`` when there is no usable one."""
    path = engine_dir / ENGINE_MANIFEST
    if not (path.is_file() and (engine_dir / ENGINE_FILE).is_file()):
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


_LABELS = {
    "tensorrt_version": "TensorRT version",
    "gpu_sm": "GPU (SM)",
    "cuda_driver": "CUDA driver",
    "nvidia_driver": "NVIDIA driver",
    "l4t_release": "JetPack (L4T) release",
    "precision": "precision",
    "profiles": "optimization profiles",
    "onnx_sha256": "ONNX graph",
    "weights_sha256": "weights",
    "plugin_sha256": "plugin library",
}


def rebuild_reason(cached: dict[str, Any] | None, wanted: EngineKey) -> str | None:
    """Why a cached engine cannot serve ``wanted`` (``None``: reuse it)."""
    if cached is None:
        return "no engine built yet"
    have = cached.get("key", {})
    for name, label in _LABELS.items():
        want = getattr(wanted, name)
        got = have.get(name)
        if name == "profiles":
            got = tuple(tuple(p) for p in got or ())
        if got != want:
            return f"{label} differs (engine: {got}, now: {want})"
    return None
