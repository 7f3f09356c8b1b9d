"""onnxscript translations: each ``torch.ops.ipcv`` op becomes one ``ipcv``-domain node."""

from __future__ import annotations

from collections.abc import Callable

import torch
from onnxscript import values

from ipcv_deploy.export.schemas import register_schemas
from ipcv_deploy.ops import DOMAIN, OPSET_VERSION
from ipcv_deploy.ops import torch_ops as _registers_torch_ops_ipcv  # noqa: F401

__all__ = ["translation_table"]

_IPCV = values.Opset(DOMAIN, OPSET_VERSION)


def _token_select(h_prev, h_cur, num_keep: int, num_prefix: int, keep_num: int, keep_den: int):
    return _IPCV.TokenSelect(
        h_prev,
        h_cur,
        num_keep=num_keep,
        num_prefix=num_prefix,
        keep_num=keep_num,
        keep_den=keep_den,
        _num_outputs=2,
    )


def _neighbor_index(x_keep, x_drop, num_neighbors: int):
    return _IPCV.NeighborIndex(x_keep, x_drop, num_neighbors=num_neighbors)


def _neighbor_reconstruct(x_keep, x0_keep, x0_drop, nbr, keep_idx, drop_idx):
    return _IPCV.NeighborReconstruct(x_keep, x0_keep, x0_drop, nbr, keep_idx, drop_idx)


def translation_table() -> dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``."""
    register_schemas()
    return {
        torch.ops.ipcv.token_select.default: _token_select,
        torch.ops.ipcv.neighbor_index.default: _neighbor_index,
        torch.ops.ipcv.neighbor_reconstruct.default: _neighbor_reconstruct,
    }
