"""The ``ipcv`` op contract: specs (``specs``) and their torch reference ops (``torch_ops``)."""

from typing import Any

from ipcv_deploy.ops.specs import (
    DOMAIN,
    KERNEL_MAX_NEIGHBORS,
    OP_SPECS,
    OPSET_VERSION,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    OpSpec,
)

_TORCH_OPS = ("neighbor_index", "neighbor_reconstruct", "token_select")


def __getattr__(name: str) -> Any:
    # The torch ops load torch: only when asked for, so the specs alone stay torch-free.
    if name in _TORCH_OPS:
        from ipcv_deploy.ops import torch_ops

        return getattr(torch_ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DOMAIN",
    "KERNEL_MAX_NEIGHBORS",
    "OPSET_VERSION",
    "OP_SPECS",
    "PLUGIN_NAMESPACE",
    "PLUGIN_VERSION",
    "OpSpec",
    "neighbor_index",
    "neighbor_reconstruct",
    "token_select",
]
