"""The static TensorRT check on real exports and on deliberately broken graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ipcv_deploy.cli import main
from ipcv_deploy.trt.check import check_model


def _rules(report) -> set[str]:
    return {f.rule for f in report.findings}


def test_trt_flavour_of_a_real_export_passes(ipcv_artifact):
    model = onnx.load(str(ipcv_artifact.flavour_file("trt")), load_external_data=False)
    report = check_model(model, "fp16")
    assert report.passed, report.findings
    assert report.ipcv_nodes == sum(1 for n in model.graph.node if n.domain == "ipcv")
    assert report.fp32_pinned_layers > 0


def test_ort_flavour_is_rejected_for_tensorrt(ipcv_artifact):
    model = onnx.load(str(ipcv_artifact.flavour_file("ort")), load_external_data=False)
    report = check_model(model)
    assert not report.passed
    assert {"function-bodies", "plugin-attributes"} <= _rules(report)


def _graph(nodes, inputs, outputs, initializers=(), opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _x(name="x", shape=(1, 8)):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _k(value: int):
    return numpy_helper.from_array(np.array([value], dtype=np.int64), "k")


@pytest.mark.parametrize(
    ("model", "rule", "severity"),
    [
        (
            _graph(
                [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk")],
                [_x(shape=(1, 8000))],
                [_x("v"), _x("i")],
                [_k(5000)],
            ),
            "topk-max-k",
            "error",
        ),
        (
            _graph(
                [helper.make_node("TopK", ["x", "kin"], ["v", "i"], name="topk")],
                [_x(), helper.make_tensor_value_info("kin", TensorProto.INT64, [1])],
                [_x("v"), _x("i")],
            ),
            "topk-constant-k",
            "error",
        ),
        (
            _graph([helper.make_node("NonZero", ["x"], ["y"], name="nz")], [_x()], [_x("y")]),
            "data-dependent-shape",
            "error",
        ),
        (
            _graph([helper.make_node("Unique", ["x"], ["y"], name="u")], [_x()], [_x("y")]),
            "data-dependent-shape",
            "error",
        ),
        (
            _graph([helper.make_node("STFT", ["x", "k"], ["y"], name="s")], [_x()], [_x("y")]),
            "unsupported-op",
            "error",
        ),
        (
            _graph(
                [helper.make_node("FusedGemm", ["x"], ["y"], name="f", domain="com.microsoft")],
                [_x()],
                [_x("y")],
            ),
            "custom-domain",
            "error",
        ),
        (
            _graph(
                [helper.make_node("TokenSelect", ["x", "x"], ["a", "b"], name="t", domain="ipcv")],
                [_x(shape=(1, 8, 4))],
                [_x("a"), _x("b")],
            ),
            "plugin-attributes",
            "error",
        ),
        (
            _graph(
                [
                    helper.make_node(
                        "NeighborIndex",
                        ["x", "x"],
                        ["n"],
                        name="nbr",
                        domain="ipcv",
                        num_neighbors=33,
                        plugin_version="1",
                        plugin_namespace="ipcv",
                    )
                ],
                [_x(shape=(1, 40, 4))],
                [_x("n")],
            ),
            "num-neighbors",
            "error",
        ),
        (
            _graph(
                [helper.make_node("Relu", ["x"], ["y"], name="r")],
                [_x(shape=(1, 2048, 2048))],
                [_x("y")],
            ),
            "dense-square-input",
            "warning",
        ),
        (
            _graph(
                [helper.make_node("Add", ["x", "w"], ["y"], name="a")],
                [_x()],
                [_x("y")],
                [numpy_helper.from_array(np.full((1, 8), 1e6, dtype=np.float32), "w")],
            ),
            "fp16-overflow",
            "warning",
        ),
        (
            _graph([helper.make_node("Relu", ["x"], ["y"], name="r")], [_x()], [_x("y")], opset=23),
            "opset",
            "warning",
        ),
    ],
)
def test_broken_graphs_are_reported(model, rule, severity):
    report = check_model(model, "fp16")
    found = [f for f in report.findings if f.rule == rule]
    assert found and found[0].severity == severity, report.findings
    assert report.passed == (severity != "error")


def test_topk_within_the_limit_passes():
    model = _graph(
        [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk")],
        [_x(shape=(1, 4000))],
        [_x("v"), _x("i")],
        [_k(3840)],
    )
    assert check_model(model).passed


def test_inspect_trt_check_exit_codes(ipcv_artifact, dense_artifact, capsys):
    assert main(["inspect", str(ipcv_artifact.path), "--trt-check"]) == 0
    assert "TensorRT check (vision.trt.onnx, fp16): accepted" in capsys.readouterr().out
    # The dense fixture has only the ONNX Runtime flavour: no ipcv nodes, but it is plain ONNX.
    assert main(["inspect", str(dense_artifact.path), "--trt-check", "--json"]) == 0
