"""Model-local ONNX functions: each ``ipcv`` op written in standard ONNX ops.

Appended to ``model.functions``, they make the ``ipcv`` nodes runnable by ONNX Runtime,
OpenVINO or any ONNX runtime with no custom library (the runtime inlines the body), while the
nodes stay visible in the graph. Each body restates the eager reference of ``ops.torch_ops``:
fp32 scores and distances, ascending index sets, fp32 NGR accumulation, and the ranking rule
of ``ops.specs.RANKING``: TopK orders equal values by index, lower first (ONNX's TopK
contract), and NaN scores / distances are replaced by -inf / +inf before ranking.
"""

from __future__ import annotations

import onnx
from onnx import AttributeProto, FunctionProto, TensorProto, helper

from ipcv_deploy.ops import DOMAIN

__all__ = ["function_protos"]


class _Body:
    """A tiny builder for a function body: ``op`` appends a node and returns its outputs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs: object) -> list[str]:
        step = f"{self.name}_{len(self.nodes)}"
        names = [f"{step}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=step, **attrs))
        return names

    def one(self, op_type: str, *inputs: str, **attrs: object) -> str:
        return self.op(op_type, *inputs, **attrs)[0]

    def const(self, value: list[int] | int | float) -> str:
        if isinstance(value, float):
            return self.one("Constant", value_float=value)
        if isinstance(value, int):
            return self.one("Constant", value_int=value)
        return self.one("Constant", value_ints=value)

    def attr_int(self, attribute: str) -> str:
        """A scalar int64 tensor holding the calling node's integer ``attribute`` (made once)."""
        name = f"{self.name}_{attribute}"
        if any(name in node.output for node in self.nodes):
            return name
        node = helper.make_node("Constant", [], [name], name=attribute)
        # An attribute reference, built directly (helper.make_attribute_ref's arguments
        # changed across onnx releases).
        node.attribute.append(
            AttributeProto(name="value_int", type=AttributeProto.INT, ref_attr_name=attribute)
        )
        self.nodes.append(node)
        return node.output[0]

    def rename_last(self, *outputs: str) -> None:
        """Give the last node's outputs the function's output names."""
        del self.nodes[-1].output[:]
        self.nodes[-1].output.extend(outputs)

    def function(
        self, op_type: str, inputs: list[str], outputs: list[str], attributes: list[str], opset: int
    ) -> FunctionProto:
        return helper.make_function(
            DOMAIN,
            op_type,
            inputs,
            outputs,
            self.nodes,
            [helper.make_opsetid("", opset)],
            attributes=attributes,
        )


def _fp32(body: _Body, x: str) -> str:
    return body.one("Cast", x, to=TensorProto.FLOAT)


def _token_select(opset: int) -> FunctionProto:
    b = _Body("token_select")
    last = b.const([-1])
    diff = b.one("Sub", _fp32(b, "h_cur"), _fp32(b, "h_prev"))
    score = b.one("Sqrt", b.one("ReduceSumSquare", diff, last, keepdims=0))  # [B, N] fp32
    score = b.one("Where", b.one("IsNaN", score), b.const(float("-inf")), score)  # NaN ranks last
    n_1d = b.one("Shape", score, start=1, end=2)  # [1] = N
    pos = b.one("Range", b.const(0), b.one("Squeeze", n_1d), b.const(1))  # [N]
    prefix = b.one("Less", pos, b.attr_int("num_prefix"))
    score = b.one("Where", prefix, b.const(float("inf")), score)
    # P = num_keep + (N - num_prefix) * keep_num // keep_den (ops.torch_ops.kept_of)
    share = b.one("Mul", b.one("Sub", n_1d, b.attr_int("num_prefix")), b.attr_int("keep_num"))
    share = b.one("Div", share, b.attr_int("keep_den"))  # int64 Div truncates: share >= 0
    keep_1d = b.one("Add", b.attr_int("num_keep"), share)
    _, top = b.op("TopK", score, keep_1d, outputs=2, axis=-1, largest=1, sorted=1)
    # Both index sets ascending: 0/1 kept flags, then the P (R) smallest of pos + N * flag.
    zeros = b.one(
        "ConstantOfShape",
        b.one("Shape", score),
        value=helper.make_tensor("", TensorProto.INT64, [1], [0]),
    )
    ones = b.one(
        "ConstantOfShape",
        b.one("Shape", top),
        value=helper.make_tensor("", TensorProto.INT64, [1], [1]),
    )
    flag = b.one("ScatterElements", zeros, top, ones, axis=1)  # 1 where kept
    n = b.one("Squeeze", n_1d)
    keep_key = b.one(
        "Cast",
        b.one("Add", pos, b.one("Mul", b.one("Sub", b.const(1), flag), n)),
        to=TensorProto.FLOAT,
    )
    drop_key = b.one("Cast", b.one("Add", pos, b.one("Mul", flag, n)), to=TensorProto.FLOAT)
    b.op("TopK", keep_key, keep_1d, outputs=2, axis=-1, largest=0, sorted=1)
    b.rename_last("_keep_values", "keep_idx")
    drop_1d = b.one("Sub", n_1d, keep_1d)
    b.op("TopK", drop_key, drop_1d, outputs=2, axis=-1, largest=0, sorted=1)
    b.rename_last("_drop_values", "drop_idx")
    return b.function(
        "TokenSelect",
        ["h_prev", "h_cur"],
        ["keep_idx", "drop_idx"],
        ["num_keep", "num_prefix", "keep_num", "keep_den"],
        opset,
    )


def _neighbor_index(opset: int) -> FunctionProto:
    b = _Body("neighbor_index")
    last = b.const([-1])
    a = _fp32(b, "x_drop")  # [B, R, D]
    k = _fp32(b, "x_keep")  # [B, P, D]
    a2 = b.one("ReduceSumSquare", a, last, keepdims=1)  # [B, R, 1]
    k2 = b.one("Unsqueeze", b.one("ReduceSumSquare", k, last, keepdims=0), b.const([1]))
    ab = b.one("MatMul", a, b.one("Transpose", k, perm=[0, 2, 1]))  # [B, R, P]
    dist = b.one("Sub", b.one("Add", a2, k2), b.one("Mul", b.const(2.0), ab))
    dist = b.one("Where", b.one("IsNaN", dist), b.const(float("inf")), dist)  # NaN is farthest
    k_1d = b.one("Unsqueeze", b.attr_int("num_neighbors"), b.const([0]))
    b.op("TopK", dist, k_1d, outputs=2, axis=-1, largest=0, sorted=1)
    b.rename_last("_distances", "nbr")
    return b.function("NeighborIndex", ["x_keep", "x_drop"], ["nbr"], ["num_neighbors"], opset)


def _neighbor_reconstruct(opset: int) -> FunctionProto:
    b = _Body("neighbor_reconstruct")
    delta = b.one("Sub", _fp32(b, "x_keep"), _fp32(b, "x0_keep"))  # [B, P, D]
    picked = b.one("GatherND", delta, b.one("Unsqueeze", "nbr", b.const([-1])), batch_dims=1)
    drift = b.one("ReduceMean", picked, b.const([2]), keepdims=0)  # [B, R, D]
    x_drop = b.one("CastLike", b.one("Add", _fp32(b, "x0_drop"), drift), "x_keep")
    values = b.one("Concat", "x_keep", x_drop, axis=1)  # kept rows, then pruned rows
    order = b.one("Unsqueeze", b.one("Concat", "keep_idx", "drop_idx", axis=1), b.const([-1]))
    where = b.one("Expand", order, b.one("Shape", values))
    b.op("ScatterElements", values, where, values, axis=1)
    b.rename_last("full")
    inputs = ["x_keep", "x0_keep", "x0_drop", "nbr", "keep_idx", "drop_idx"]
    return b.function("NeighborReconstruct", inputs, ["full"], [], opset)


def function_protos(opset: int) -> list[FunctionProto]:
    """The three ``ipcv`` functions, written against standard-domain ``opset`` (>= 18)."""
    return [_token_select(opset), _neighbor_index(opset), _neighbor_reconstruct(opset)]
