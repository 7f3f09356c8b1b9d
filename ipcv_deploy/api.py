"""The public entry points: compress a vision tower in place, or undo it."""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from ipcv_deploy.compression import ipcv_encode
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.models import adapter_for_module

__all__ = ["apply_ipcv", "remove_ipcv"]

_DENSE = "_ipcv_dense_forward"


def apply_ipcv(model: nn.Module, config: IPCVConfig | None = None) -> nn.Module:
    """Compress a vision encoder with IPCV, in place.

    The tower keeps its weights, forward signature and output shapes, so a full model
    (``Qwen2VLForConditionalGeneration``, ``InternVLForConditionalGeneration``) runs
    ``generate`` unchanged. Applying again replaces the settings.

    Args:
        model: a transformers vision tower, or a full multimodal model holding one.
        config: IPCV settings; ``None`` takes the family's reference settings.

    Returns:
        ``model`` itself, its vision tower now compressed.

    Raises:
        UnsupportedModelError: ``model`` is of no supported family.
        ConfigError: ``config.prune_layer`` does not fit the tower's depth.

    Example:
        >>> vision = apply_ipcv(model.model.visual, IPCVConfig(keep_ratio=0.35))
    """
    adapter_cls, vision = adapter_for_module(model)
    adapter = adapter_cls(vision)
    config = config or adapter_cls.reference_ipcv()
    config.check_depth(adapter.depth)
    adapter.prepare(config, refresh=True)
    dense = getattr(vision, _DENSE, None) or vision.forward

    @functools.wraps(dense)
    def forward(*args: Any, **kwargs: Any) -> Any:
        return ipcv_encode(adapter, config, *args, **kwargs).output

    vision.forward = forward
    setattr(vision, _DENSE, dense)
    vision.ipcv_config = config
    return model


def remove_ipcv(model: nn.Module) -> nn.Module:
    """Restore the dense forward of a tower compressed by ``apply_ipcv`` (no-op otherwise)."""
    adapter_cls, vision = adapter_for_module(model)
    dense = vision.__dict__.pop(_DENSE, None)
    if dense is not None:
        del vision.forward
        del vision.ipcv_config
        adapter_cls(vision).release()
    return model
