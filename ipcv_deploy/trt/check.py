"""Static TensorRT check: will TensorRT's ONNX parser and builder accept this graph?

Pure Python over the ONNX graph (no TensorRT, no GPU), so it runs in CI and on a laptop
before anyone walks to the GPU. Errors stop a build; warnings name risks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ipcv_deploy.ops import (
    DOMAIN,
    KERNEL_MAX_NEIGHBORS,
    OP_SPECS,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
)
from ipcv_deploy.trt.onnx_support import (
    DATA_DEPENDENT_SHAPE_OPS,
    MAX_PARSER_OPSET,
    PARSER_SUPPORTED_OPS,
    TOPK_MAX_K,
)

__all__ = ["FP16_MAX", "FP32_PINNED_OPS", "Finding", "TrtCheckReport", "check_model"]

FP16_MAX = 65504.0
#: Layers an fp16 / bf16 engine keeps in fp32 (overflow / accuracy): the builder pins them.
FP32_PINNED_OPS = frozenset({"Softmax", "LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Exp"})
_IPCV_OPS = frozenset(spec.name for spec in OP_SPECS)


@dataclass(frozen=True)
class Finding:
    """One problem or risk: ``severity`` is ``error`` (the parse or build fails) or ``warning``."""

    severity: str
    rule: str
    node: str
    message: str


@dataclass
class TrtCheckReport:
    """Everything the static check found."""

    findings: list[Finding] = field(default_factory=list)
    ipcv_nodes: int = 0
    fp32_pinned_layers: int = 0

    @property
    def passed(self) -> bool:
        """No errors (warnings allowed)."""
        return not any(f.severity == "error" for f in self.findings)

    def add(self, severity: str, rule: str, node: str, message: str) -> None:
        """Record a finding."""
        self.findings.append(Finding(severity, rule, node, message))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {**asdict(self), "passed": self.passed}


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers stored inline and Constant outputs (external weights are not read)."""
    values = {
        t.name: numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_location != onnx.TensorProto.EXTERNAL
    }
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _check_ipcv_node(node: onnx.NodeProto, report: TrtCheckReport) -> None:
    report.ipcv_nodes += 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    version = attrs.get("plugin_version", b"1").decode()
    namespace = attrs.get("plugin_namespace", b"").decode()
    if node.op_type not in _IPCV_OPS:
        report.add("error", "ipcv-op", node.name, f"unknown ipcv op {node.op_type}")
    elif (version, namespace) != (PLUGIN_VERSION, PLUGIN_NAMESPACE):
        report.add(
            "error",
            "plugin-attributes",
            node.name,
            f"{node.op_type} has plugin_version={version!r}, plugin_namespace={namespace!r}; "
            f"the ipcv plugins register version {PLUGIN_VERSION!r} in namespace "
            f"{PLUGIN_NAMESPACE!r}: use the artifact's TensorRT flavour (export --target trt)",
        )
    if attrs.get("num_neighbors", 0) > KERNEL_MAX_NEIGHBORS:
        report.add(
            "error",
            "num-neighbors",
            node.name,
            f"{node.op_type} has num_neighbors={attrs['num_neighbors']}; the plugin kernels take "
            f"at most {KERNEL_MAX_NEIGHBORS}: export with --num-neighbors {KERNEL_MAX_NEIGHBORS} "
            "or fewer",
        )


def _check_topk(node: onnx.NodeProto, constants: dict[str, np.ndarray], report: TrtCheckReport):
    k = constants.get(node.input[1]) if len(node.input) > 1 else None
    if k is None:
        report.add(
            "error",
            "topk-constant-k",
            node.name,
            "TopK with a K computed at run time: TensorRT needs a build-time constant K",
        )
    elif int(np.max(k)) > TOPK_MAX_K:
        report.add(
            "error",
            "topk-max-k",
            node.name,
            f"TopK with K={int(np.max(k))} > {TOPK_MAX_K}, TensorRT's limit; the ipcv plugins "
            "select without TopK",
        )


def _check_dense_inputs(model: onnx.ModelProto, limit: int, report: TrtCheckReport) -> None:
    for value in model.graph.input:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if len(dims) >= 2 and dims[-1] == dims[-2] and dims[-1] >= limit:
            report.add(
                "warning",
                "dense-square-input",
                value.name,
                f"input {value.name} is a dense {dims[-2]}x{dims[-1]} matrix (attention mask?): "
                "memory grows quadratically with the token count",
            )


def check_model(
    model: onnx.ModelProto, precision: str = "fp16", dense_limit: int = 1024
) -> TrtCheckReport:
    """Check a graph (loaded without external data) for TensorRT.

    Args:
        model: the ONNX model; the TensorRT flavour of an artifact should pass.
        precision: ``fp32`` / ``fp16`` / ``bf16``: half precisions add overflow checks.
        dense_limit: report square graph inputs of at least this side.
    """
    report = TrtCheckReport()
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset > MAX_PARSER_OPSET:
        report.add(
            "warning",
            "opset",
            "",
            f"ai.onnx opset {opset} is newer than the {MAX_PARSER_OPSET} TensorRT 10.0's parser "
            "documents; use a TensorRT release that lists it",
        )
    local = {(f.domain, f.name) for f in model.functions}
    for domain, name in sorted(local):
        if domain == DOMAIN:
            report.add(
                "error",
                "function-bodies",
                name,
                f"the graph carries a function body for ipcv::{name}: TensorRT's parser would "
                "inline it instead of using the plugin; use the TensorRT flavour (vision.trt.onnx)",
            )
    constants = _constants(model)
    for node in model.graph.node:
        if node.domain == DOMAIN:
            _check_ipcv_node(node, report)
        elif node.domain not in ("", "ai.onnx"):
            if (node.domain, node.op_type) not in local:
                report.add(
                    "error",
                    "custom-domain",
                    node.name,
                    f"{node.domain}::{node.op_type} has no TensorRT importer; TensorRT will look "
                    f"for a plugin named {node.op_type!r}",
                )
        elif node.op_type in DATA_DEPENDENT_SHAPE_OPS:
            report.add(
                "error",
                "data-dependent-shape",
                node.name,
                f"{node.op_type} has a data-dependent output shape; prune with a static kept "
                "count instead",
            )
        elif node.op_type not in PARSER_SUPPORTED_OPS:
            report.add(
                "error",
                "unsupported-op",
                node.name,
                f"{node.op_type} is not imported by TensorRT's ONNX parser (support matrix)",
            )
        elif node.op_type == "TopK":
            _check_topk(node, constants, report)
        if precision != "fp32" and node.op_type in FP32_PINNED_OPS:
            report.fp32_pinned_layers += 1
    _check_dense_inputs(model, dense_limit, report)
    if precision == "fp16":
        for name, value in constants.items():
            if value.dtype.kind == "f" and value.size and float(np.abs(value).max()) > FP16_MAX:
                report.add(
                    "warning",
                    "fp16-overflow",
                    name,
                    f"constant {name} holds {float(np.abs(value).max()):.3g} > {FP16_MAX}, "
                    "which fp16 cannot represent; build in bf16 or fp32",
                )
    return report
