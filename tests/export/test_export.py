"""ONNX export of the tiny presets, run on ONNX Runtime and compared with PyTorch."""

from __future__ import annotations

import onnx
import pytest
import torch

from ipcv_deploy.backends.onnxruntime_backend import OrtBackend
from ipcv_deploy.backends.verify import reference_encoder, verify_artifact
from ipcv_deploy.errors import ArtifactError, InputError
from ipcv_deploy.models import load_model
from ipcv_deploy.ops import DOMAIN, OP_SPECS, PLUGIN_NAMESPACE, PLUGIN_VERSION
from tests.conftest import export_tiny, hf_image_features
from tests.parity import assert_close, assert_same_indices


def test_export_verifies_against_pytorch(ipcv_artifact):
    report = verify_artifact(ipcv_artifact, batch=3, rtol=1e-5)
    assert report.passed, report.to_dict()
    checked_ops = {c.name.split("_")[0] for c in report.ops}
    assert checked_ops == {spec.name for spec in OP_SPECS}
    index_checks = [c for c in report.outputs + report.ops if c.kind == "index"]
    assert index_checks and all(c.mismatched == 0 for c in index_checks)
    worst = max(c.max_rel for c in report.outputs + report.ops)
    assert worst <= 1e-5


def test_manifest_describes_the_graph(ipcv_artifact):
    m = ipcv_artifact.manifest
    encoder = reference_encoder(ipcv_artifact)
    (pixels,) = encoder.inputs(1)
    assert m.inputs[0].shape == ("batch", *pixels.shape[1:])
    with torch.no_grad():
        embeds, keep_idx = encoder(pixels)
    assert m.outputs[0].shape == ("batch", *embeds.shape[1:])
    assert m.outputs[1].shape == ("batch", m.kept_per_image) == ("batch", keep_idx.shape[1])
    assert m.opsets == {"": 18, DOMAIN: 1}
    assert m.output_kind == "llm_embeddings"
    assert m.flops_per_image["exported"] < m.flops_per_image["dense"]


def test_dynamic_batch_equals_per_image(ipcv_artifact):
    backend = OrtBackend(ipcv_artifact)
    (pixels,) = reference_encoder(ipcv_artifact).inputs(3, seed=4)
    batched = backend(pixels)
    for i in range(3):
        single = backend(pixels[i : i + 1])
        assert_close(batched["image_embeds"][i : i + 1], single["image_embeds"], rtol=1e-5)
        assert_same_indices(batched["keep_idx"][i : i + 1], single["keep_idx"])


def test_dense_export_equals_dense_transformers_model(dense_artifact):
    """The dense graph against the unmodified Hugging Face tower (+ projector)."""
    assert dense_artifact.manifest.ipcv is None
    loaded = load_model(dense_artifact.manifest.source["preset"], seed=0)
    (pixels,) = reference_encoder(dense_artifact).inputs(2, seed=3)
    got = OrtBackend(dense_artifact)(pixels)["image_embeds"]
    want = hf_image_features(loaded, pixels)
    assert_close(got, want.reshape(got.shape), rtol=1e-5, what="dense ONNX vs transformers")


def test_ort_flavour_carries_function_bodies_and_trt_flavour_plugin_attributes(ipcv_artifact):
    ort_model = onnx.load(str(ipcv_artifact.flavour_file("ort")), load_external_data=False)
    trt_model = onnx.load(str(ipcv_artifact.flavour_file("trt")), load_external_data=False)
    names = {spec.name for spec in OP_SPECS}
    assert {(f.domain, f.name) for f in ort_model.functions} == {(DOMAIN, n) for n in names}
    assert not trt_model.functions
    for model, plugin in ((ort_model, False), (trt_model, True)):
        nodes = [n for n in model.graph.node if n.domain == DOMAIN]
        assert {n.op_type for n in nodes} == names
        for node in nodes:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if plugin:
                assert attrs["plugin_version"] == PLUGIN_VERSION.encode()
                assert attrs["plugin_namespace"] == PLUGIN_NAMESPACE.encode()
            else:
                assert "plugin_version" not in attrs
        assert {(o.domain, o.version) for o in model.opset_import} == {("", 18), (DOMAIN, 1)}
        assert model.ir_version <= 10


def test_onnx_checker_and_shape_inference_pass(ipcv_artifact):
    for flavour in ("ort", "trt"):
        path = str(ipcv_artifact.flavour_file(flavour))
        onnx.checker.check_model(path, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(
        onnx.load(str(ipcv_artifact.flavour_file("ort")), load_external_data=False),
        check_type=True,
        strict_mode=True,
    )
    out = inferred.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in out] == list(
        ipcv_artifact.manifest.outputs[0].shape
    )


def test_wrong_pixel_shape_is_refused(ipcv_artifact):
    (pixels,) = reference_encoder(ipcv_artifact).inputs(1)
    with pytest.raises(InputError, match=r"do not fit this artifact"):
        OrtBackend(ipcv_artifact)(pixels[:, :-4])


def test_trt_only_artifact_cannot_run_on_onnx_runtime(tmp_path):
    artifact = export_tiny("tiny-internvl", tmp_path / "trt", target="trt")
    with pytest.raises(ArtifactError, match=r"no 'ort' flavour.*--target ort"):
        OrtBackend(artifact)


def test_llava_next_tile_encoder_exports_and_verifies(exports):
    """LLaVA-NeXT exports the per-tile encoder + projector; tile packing stays in the runtime."""
    artifact = exports("tiny-llava-next", return_indices=True)
    assert artifact.manifest.family == "LLaVA-NeXT (CLIP, anyres)"
    assert artifact.manifest.outputs[0].shape == ("batch", 64, 96)
    report = verify_artifact(artifact, batch=3)
    assert report.passed, report.to_dict()
