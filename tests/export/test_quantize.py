"""int8 exports for ONNX Runtime: plain weight initializers, what is quantized and what is not,
and verify against the fp32 PyTorch reference with the documented limits."""

from __future__ import annotations

import onnx
import onnxruntime
import pytest
import torch
from onnx import numpy_helper
from packaging.version import Version

from ipcv_deploy.backends.onnxruntime_backend import OrtBackend
from ipcv_deploy.backends.verify import INT8_LIMITS, reference_encoder, verify_artifact
from ipcv_deploy.cli import main
from ipcv_deploy.export.quantize import fp32_selection_nodes
from ipcv_deploy.ops import DOMAIN
from ipcv_deploy.parity import compare
from tests.conftest import TINY


def _graph(artifact) -> onnx.ModelProto:
    return onnx.load(str(artifact.flavour_file("ort")), load_external_data=False)


def _weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul / Gemm nodes with a float weight (what int8 quantization rewrites)."""
    weights = {t.name for t in model.graph.initializer}
    products = ("MatMul", "Gemm")
    return [n for n in model.graph.node if n.op_type in products and n.input[1] in weights]


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_projections_are_plain_weight_initializers(exports, name):
    """No run-time Slice of a fused qkv weight: every projection is a weight MatMul."""
    model = _graph(exports(name, return_indices=True))
    weights = {t.name for t in model.graph.initializer}
    sliced = [n.name for n in model.graph.node if n.op_type == "Slice" and n.input[0] in weights]
    assert sliced == []
    depth = 12  # per block: qkv (or q and k/v in an AS block), proj, 2 (3 gated) MLP matrices
    assert len(_weight_matmuls(model)) >= 4 * depth


@pytest.mark.parametrize("name", TINY)
def test_int8_export_verifies_within_its_limits(exports, name):
    artifact = exports(name, return_indices=True, quantize="int8")
    q = artifact.manifest.quantization
    assert q["mode"] == "int8" and q["fp32_matmuls"] > 0 and q["int8_matmuls"] > 0
    report = verify_artifact(artifact, batch=2)
    assert report.limits == INT8_LIMITS["int8"]
    assert report.passed, report.to_dict()
    # The selection runs on fp32 hidden states: kept, pruned and neighbour indices as fp32.
    assert all(c.mismatched == 0 for c in report.ops if c.kind == "index")
    assert min(c.cosine for c in report.outputs) >= INT8_LIMITS["int8"]["min_cosine"]


def test_int8_quantizes_after_the_selection_and_leaves_the_ipcv_ops_alone(exports):
    fp32 = _graph(exports("tiny-qwen2-vl", return_indices=True))
    artifact = exports("tiny-qwen2-vl", return_indices=True, quantize="int8")
    int8 = _graph(artifact)
    assert [f.SerializeToString() for f in int8.functions] == [
        f.SerializeToString() for f in fp32.functions
    ]
    assert [n.attribute for n in int8.graph.node if n.domain == DOMAIN] == [
        n.attribute for n in fp32.graph.node if n.domain == DOMAIN
    ]
    upstream = set(fp32_selection_nodes(fp32))
    left_fp32 = {n.name for n in _weight_matmuls(int8)}
    assert left_fp32 == upstream  # exactly the MatMuls the selection depends on stay fp32
    q = artifact.manifest.quantization
    assert q["fp32_matmuls"] == len(upstream)
    assert sum(n.op_type == "MatMulInteger" for n in int8.graph.node) == q["int8_matmuls"]


@pytest.mark.skipif(
    Version(onnxruntime.__version__) < Version("1.22"),
    reason="onnxruntime 1.21's quantize_dynamic fails in its own shape-inference pass on this "
    "graph (which onnx's shape inference accepts, strict too); 1.32 runs it",
)
def test_int8_equals_onnx_runtimes_own_quantize_dynamic(exports, tmp_path):
    """The streaming writer gives what quantize_dynamic gives: the same int8 weights and the
    same outputs, bit for bit (with the same products kept fp32)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ipcv_deploy.export import register_schemas

    fp32 = exports("tiny-qwen2-vl", return_indices=True)
    ours = exports("tiny-qwen2-vl", return_indices=True, quantize="int8")
    register_schemas()
    reference = tmp_path / "vision.onnx"
    quantize_dynamic(
        str(fp32.flavour_file("ort")),
        str(reference),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=fp32_selection_nodes(_graph(fp32)),
        use_external_data_format=True,
    )
    (pixels,) = reference_encoder(fp32).inputs(2, seed=5)
    mine = OrtBackend(ours)(pixels)["image_embeds"]
    session = onnxruntime.InferenceSession(str(reference), providers=["CPUExecutionProvider"])
    theirs = session.run(["image_embeds"], {"pixel_values": pixels.numpy()})[0]
    assert compare(torch.from_numpy(theirs), mine).max_abs == 0.0
    ref_model = onnx.load(str(reference))
    ref_int8 = sorted(
        numpy_helper.to_array(t).tobytes() for t in ref_model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2
    )  # fmt: skip
    our_model = onnx.load(str(ours.flavour_file("ort")))
    our_int8 = sorted(
        numpy_helper.to_array(t).tobytes() for t in our_model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2
    )  # fmt: skip
    assert our_int8 == ref_int8


def test_int8_full_quantizes_everything_and_reports_index_changes(exports):
    artifact = exports("tiny-qwen2-vl", return_indices=True, quantize="int8-full")
    assert _weight_matmuls(_graph(artifact)) == []
    assert artifact.manifest.quantization["fp32_matmuls"] == 0
    report = verify_artifact(artifact, batch=2)
    assert report.limits == INT8_LIMITS["int8-full"] and report.passed, report.to_dict()
    assert sum(c.mismatched for c in report.ops if c.kind == "index") > 0  # as documented


def test_dense_int8_quantizes_every_weight_matmul(exports):
    artifact = exports("tiny-internvl", dense=True, target="ort", quantize="int8")
    assert _weight_matmuls(_graph(artifact)) == []
    assert verify_artifact(artifact, batch=2).passed


def test_export_quantize_int8_end_to_end(tmp_path, capsys):
    """The CLI: export --quantize int8 (ort target implied), then verify passes."""
    out = tmp_path / "int8"
    argv = ["export", "--model", "tiny-internvl", "--quantize", "int8", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "int8: 20 weight MatMuls int8" in printed and "ort: vision.onnx" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]  # no fp32 leftovers
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "vision.onnx",
        "vision.onnx.data",
    ]
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir())
    assert main(["verify", str(out)]) == 0
    assert "indices identical (the selection runs in fp32)" in capsys.readouterr().out


def test_int8_is_for_onnx_runtime_only(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["export", "--model", "tiny-internvl", "--quantize", "int8", "--target", "trt"]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --quantize int8 is for ONNX Runtime") and "--target ort" in err
    assert list(tmp_path.iterdir()) == []
