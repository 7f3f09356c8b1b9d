"""``onnx.defs`` schemas of the ``ipcv`` ops, built from ``ops.specs``.

Registered schemas let the onnxscript translations emit the nodes, and let
``onnx.checker.check_model(full_check=True)`` and shape inference understand them.
"""

from __future__ import annotations

import onnx
from onnx.defs import OpSchema

from ipcv_deploy.ops import DOMAIN, OP_SPECS, OPSET_VERSION, OpSpec
from ipcv_deploy.ops.specs import TensorSpec

__all__ = ["register_schemas"]

_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _schema(spec: OpSpec) -> OpSchema:
    def param(tensor: TensorSpec) -> OpSchema.FormalParameter:
        type_str = "T" if tensor.kind == "float" else "tensor(int64)"
        return OpSchema.FormalParameter(tensor.name, type_str, f"{tensor.doc} {list(tensor.shape)}")

    return OpSchema(
        spec.name,
        DOMAIN,
        OPSET_VERSION,
        doc=spec.doc,
        inputs=[param(t) for t in spec.inputs],
        outputs=[param(t) for t in spec.outputs],
        type_constraints=[("T", _FLOAT_TYPES, "float tensors of one dtype")],
        attributes=[
            *(
                OpSchema.Attribute(a.name, OpSchema.AttrType.INT, a.doc, required=True)
                for a in spec.attributes
            ),
            # Read by TensorRT's ONNX parser to find the plugin (the ``trt`` flavour).
            OpSchema.Attribute(
                "plugin_version",
                OpSchema.AttrType.STRING,
                "TensorRT plugin version",
                required=False,
            ),
            OpSchema.Attribute(
                "plugin_namespace",
                OpSchema.AttrType.STRING,
                "TensorRT plugin namespace",
                required=False,
            ),
        ],
    )


def register_schemas() -> None:
    """Register every ``ipcv`` op schema with onnx once per process (idempotent)."""
    for spec in OP_SPECS:
        if not onnx.defs.has(spec.name, DOMAIN):
            onnx.defs.register_schema(_schema(spec))
