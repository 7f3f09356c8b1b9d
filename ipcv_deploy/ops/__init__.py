"""The ``ipcv`` op contract: specs (``specs``) and their torch reference ops (``torch_ops``)."""

from ipcv_deploy.ops.specs import (
    DOMAIN,
    KERNEL_MAX_NEIGHBORS,
    OP_SPECS,
    OPSET_VERSION,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    OpSpec,
)
from ipcv_deploy.ops.torch_ops import neighbor_index, neighbor_reconstruct, token_select

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
