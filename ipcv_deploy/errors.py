"""The exception hierarchy: every error a user can cause is an ``IpcvError``.

The CLI prints an ``IpcvError`` as one ``error: <message>`` line without a traceback; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "BackendUnavailableError",
    "CompatibilityError",
    "ConfigError",
    "InputError",
    "IpcvError",
    "UnsupportedModelError",
]


class IpcvError(Exception):
    """Root of all user-facing errors; the message is one line naming the problem and the fix."""


class ConfigError(IpcvError, ValueError):
    """An IPCV / export / build setting is out of range or inconsistent with the model."""


class InputError(IpcvError, ValueError):
    """A model input (image size, grid, tensor shape) does not fit the encoder."""


class UnsupportedModelError(IpcvError):
    """A model class, ``model_type``, preset or checkpoint directory that no adapter serves."""


class ArtifactError(IpcvError):
    """An artifact or checkpoint on disk is corrupt, truncated, mismatched or of a newer version."""


class BackendUnavailableError(IpcvError):
    """A backend dependency (onnxruntime, TensorRT, a plugin library) is missing."""


class CompatibilityError(IpcvError):
    """An installed dependency (transformers, ...) behaves unlike the versions ipcv-deploy tests."""
