"""Bad artifacts and bad export requests: one-line errors, nothing half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ipcv_deploy.artifact import MANIFEST_NAME, load_artifact
from ipcv_deploy.errors import ArtifactError, InputError
from ipcv_deploy.export import ExportOptions, export_encoder, onnx_export
from ipcv_deploy.models import load_model


@pytest.fixture
def artifact_copy(ipcv_artifact, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(ipcv_artifact.path, out)
    return out


def _edit_manifest(path: Path, **changes) -> None:
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    for key, value in changes.items():
        manifest[key] = value
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_a_flipped_byte_in_the_weights_is_refused(artifact_copy):
    data = artifact_copy / "vision.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"does not match the SHA-256.*re-export"):
        load_artifact(artifact_copy, check="full")


def test_loading_to_run_checks_stamps_not_every_byte(artifact_copy, tmp_path):
    """The default check reads ~3 MiB a file: a replaced start or end is refused at once."""
    data = artifact_copy / "vision.onnx.data"
    raw = bytearray(data.read_bytes())
    assert load_artifact(artifact_copy).manifest.files["vision.onnx.data"].stamp
    raw[10] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"does not match the stamp.*re-export"):
        load_artifact(artifact_copy)
    assert load_artifact(artifact_copy, check="size")  # sizes only: the export's own read-back


def test_artifact_files_are_readable_by_everyone(ipcv_artifact):
    for path in ipcv_artifact.path.iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_a_truncated_graph_is_refused(artifact_copy):
    graph = artifact_copy / "vision.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match=r"truncated"):
        load_artifact(artifact_copy)


def test_a_graph_from_another_export_is_refused(artifact_copy, exports):
    other = exports("tiny-internvl", dense=True, target="ort")
    shutil.copy(other.path / "vision.onnx", artifact_copy / "vision.onnx")
    with pytest.raises(ArtifactError, match=r"vision.onnx"):
        load_artifact(artifact_copy)


def test_a_newer_ipcv_op_set_is_refused(artifact_copy):
    _edit_manifest(artifact_copy, opsets={"": 18, "ipcv": 2})
    with pytest.raises(ArtifactError, match=r"ipcv op set version 2.*upgrade ipcv-deploy"):
        load_artifact(artifact_copy)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match=r"has no manifest.json"):
        load_artifact(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ArtifactError, match=r"not valid JSON"):
        load_artifact(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ArtifactError, match=r"not an ipcv-deploy"):
        load_artifact(tmp_path)


def test_missing_manifest_fields_are_named(artifact_copy):
    manifest = json.loads((artifact_copy / MANIFEST_NAME).read_text())
    del manifest["image_size"]
    (artifact_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"missing \['image_size'\]"):
        load_artifact(artifact_copy)


def test_existing_output_needs_force_and_stays_untouched(ipcv_artifact):
    before = {p.name: p.stat().st_mtime_ns for p in ipcv_artifact.path.iterdir()}
    loaded = load_model("tiny-internvl", seed=0)
    options = ExportOptions(loaded.image_size, loaded.adapter.reference_ipcv())
    with pytest.raises(ArtifactError, match=r"already exists; pass --force"):
        export_encoder(loaded, options, ipcv_artifact.path)
    assert {p.name: p.stat().st_mtime_ns for p in ipcv_artifact.path.iterdir()} == before


def test_wrong_image_size_writes_nothing(tmp_path):
    loaded = load_model("tiny-qwen2-vl", seed=0)
    options = ExportOptions((230, 224), loaded.adapter.reference_ipcv())
    with pytest.raises(InputError, match=r"multiples of patch x merge = 28"):
        export_encoder(loaded, options, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_failing_export_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(encoder, inputs, path, tokens):
        path.write_bytes(b"half a graph")
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(onnx_export, "_torch_export", broken)
    loaded = load_model("tiny-internvl", dtype=torch.float32, seed=0)
    options = ExportOptions(loaded.image_size, loaded.adapter.reference_ipcv())
    with pytest.raises(RuntimeError, match=r"conversion failed"):
        export_encoder(loaded, options, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
