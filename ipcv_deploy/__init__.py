"""ipcv-deploy: IPCV token compression inside the vision encoders of multimodal LLMs.

``apply_ipcv(vision_tower, IPCVConfig(...))`` compresses a transformers vision tower in place;
``ipcv-export`` (``ipcv_deploy.cli``) drives demo and benchmarks.
"""

from typing import Any

from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.errors import (
    ArtifactError,
    BackendUnavailableError,
    CompatibilityError,
    ConfigError,
    InputError,
    IpcvError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "BackendUnavailableError",
    "CompatibilityError",
    "ConfigError",
    "IPCVConfig",
    "InputError",
    "IpcvError",
    "UnsupportedModelError",
    "__version__",
    "apply_ipcv",
    "remove_ipcv",
]


def __getattr__(name: str) -> Any:
    # ``apply_ipcv`` loads torch and transformers: only when used, so the torch-free parts
    # (artifact checks, the ONNX Runtime GenAI runtime) import without them.
    if name in ("apply_ipcv", "remove_ipcv"):
        from ipcv_deploy import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
