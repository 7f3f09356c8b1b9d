"""Each ``ipcv`` function body alone, in a plain ONNX Runtime session (no custom library),
against the PyTorch reference op: identical indices, fp32 values within 1e-5."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper

from ipcv_deploy.compression import gather_tokens
from ipcv_deploy.export import ONNX_OPSET, register_schemas
from ipcv_deploy.export.functions import function_protos
from ipcv_deploy.ops import DOMAIN, OP_SPECS, neighbor_index, neighbor_reconstruct, token_select
from tests.cases import duplicated_kept_rows, large_norm_stream, tie_inputs
from tests.parity import assert_close, assert_same_indices

_TYPES = {
    torch.float32: TensorProto.FLOAT,
    torch.float16: TensorProto.FLOAT16,
}
DTYPES = [torch.float32, torch.float16]


def _session(op_type: str, dtype: torch.dtype, **attrs) -> onnxruntime.InferenceSession:
    """A one-node model of ``op_type`` whose only implementation is its function body."""
    register_schemas()
    spec = next(s for s in OP_SPECS if s.name == op_type)

    def info(t):
        elem = _TYPES[dtype] if t.kind == "float" else TensorProto.INT64
        return helper.make_tensor_value_info(t.name, elem, list(t.shape))

    node = helper.make_node(
        op_type,
        [t.name for t in spec.inputs],
        [t.name for t in spec.outputs],
        domain=DOMAIN,
        **attrs,
    )
    graph = helper.make_graph(
        [node], op_type, [info(t) for t in spec.inputs], [info(t) for t in spec.outputs]
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(DOMAIN, 1)],
        functions=function_protos(ONNX_OPSET),
    )
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    # Default session options: no custom-op library is registered.
    return onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )


def _run(session, **feeds):
    return [
        torch.from_numpy(o) for o in session.run(None, {k: v.numpy() for k, v in feeds.items()})
    ]


def _check_token_select(h_prev, h_cur, num_keep, num_prefix, keep_num=0, keep_den=1):
    session = _session(
        "TokenSelect",
        h_cur.dtype,
        num_keep=num_keep,
        num_prefix=num_prefix,
        keep_num=keep_num,
        keep_den=keep_den,
    )
    keep, drop = _run(session, h_prev=h_prev, h_cur=h_cur)
    want_keep, want_drop = token_select(h_prev, h_cur, num_keep, num_prefix, keep_num, keep_den)
    assert_same_indices(keep, want_keep, "keep_idx")
    assert_same_indices(drop, want_drop, "drop_idx")


@pytest.mark.parametrize(("tokens", "num_prefix"), [(20, 0), (57, 0), (57, 1), (1025, 1)])
def test_token_select_body_keeps_a_share_of_a_dynamic_token_count(tokens, num_prefix):
    """The ratio form (native resolution): P = prefix + floor((N - prefix) * 7 / 20) from the
    input's shape, in the body as in the op."""
    gen = torch.Generator().manual_seed(tokens)
    h_prev, h_cur = torch.randn(2, 2, tokens, 16, generator=gen)
    _check_token_select(h_prev, h_cur, num_prefix, num_prefix, 7, 20)
    keep, _ = token_select(h_prev, h_cur, num_prefix, num_prefix, 7, 20)
    assert keep.shape[1] == num_prefix + (tokens - num_prefix) * 7 // 20


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_keep", "num_prefix"), [(1, 0), (18, 0), (18, 1), (50, 1), (49, 3)])
def test_token_select_body(num_keep, num_prefix, dtype):
    gen = torch.Generator().manual_seed(num_keep)
    h_prev, h_cur = (torch.randn(3, 50, 16, generator=gen).to(dtype) for _ in range(2))
    _check_token_select(h_prev, h_cur, num_keep, num_prefix)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_keep", "num_prefix"), [(1, 0), (11, 0), (11, 1), (20, 3)])
def test_token_select_body_ties_and_nan(num_keep, num_prefix, dtype):
    h_prev, h_cur = tie_inputs()
    _check_token_select(h_prev.to(dtype), h_cur.to(dtype), num_keep, num_prefix)


def test_token_select_body_scores_half_inputs_in_fp32():
    h_prev, h_cur = large_norm_stream()
    _check_token_select(h_prev, h_cur, 70, 0)


def _pools(seed: int, dtype: torch.dtype, batch: int = 2, tokens: int = 40, keep: int = 14):
    gen = torch.Generator().manual_seed(seed)
    h_prev, h_cur = torch.randn(2, batch, tokens, 24, generator=gen).to(dtype)
    keep_idx, drop_idx = token_select(h_prev, h_cur, keep, 0)
    return h_cur, keep_idx, drop_idx, gather_tokens(h_cur, keep_idx), gather_tokens(h_cur, drop_idx)


def _check_neighbor_index(x_keep, x_drop, k):
    session = _session("NeighborIndex", x_keep.dtype, num_neighbors=k)
    (nbr,) = _run(session, x_keep=x_keep, x_drop=x_drop)
    assert_same_indices(nbr, neighbor_index(x_keep, x_drop, k), "nbr")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 5, 14])
def test_neighbor_index_body(k, dtype):
    _, _, _, x_keep, x_drop = _pools(k, dtype)
    _check_neighbor_index(x_keep, x_drop, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3, 12])
def test_neighbor_index_body_ties_and_nan(k, dtype):
    x_keep, x_drop = duplicated_kept_rows()
    _check_neighbor_index(x_keep.to(dtype), x_drop.to(dtype), k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_neighbor_reconstruct_body(dtype):
    _, keep_idx, drop_idx, x0_keep, x0_drop = _pools(3, dtype)
    nbr = neighbor_index(x0_keep, x0_drop, 5)
    x_keep = (x0_keep.float() * 1.3 - 0.2).to(dtype)
    feeds = dict(
        x_keep=x_keep,
        x0_keep=x0_keep,
        x0_drop=x0_drop,
        nbr=nbr,
        keep_idx=keep_idx,
        drop_idx=drop_idx,
    )
    (full,) = _run(_session("NeighborReconstruct", dtype), **feeds)
    want = neighbor_reconstruct(x_keep, x0_keep, x0_drop, nbr, keep_idx, drop_idx)
    assert full.dtype == dtype
    assert_close(full.float(), want.float(), rtol=1e-5 if dtype == torch.float32 else 1e-3)


def test_ngr_body_is_exact_at_block_k():
    h_cur, keep_idx, drop_idx, x0_keep, x0_drop = _pools(7, torch.float32)
    nbr = neighbor_index(x0_keep, x0_drop, 5)
    feeds = dict(
        x_keep=x0_keep,
        x0_keep=x0_keep,
        x0_drop=x0_drop,
        nbr=nbr,
        keep_idx=keep_idx,
        drop_idx=drop_idx,
    )
    (full,) = _run(_session("NeighborReconstruct", torch.float32), **feeds)
    assert torch.equal(full, h_cur)
    assert np.isfinite(full.numpy()).all()
