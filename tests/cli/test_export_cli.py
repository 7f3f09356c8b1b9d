"""``export``, ``inspect`` and ``verify`` through main(), human and ``--json`` output."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from ipcv_deploy.cli import main


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "internvl"
    args = ["export", "--model", "tiny-internvl", "--keep-ratio", "0.5", "--out", str(out)]
    assert main(args) == 0
    return out


def test_export_prints_what_it_wrote(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--model", "tiny-internvl", "--dense", "--target", "ort"]) == 0
    out = capsys.readouterr().out
    assert "exported InternVL3 encoder to engines/tiny-internvl-dense" in out
    assert "next: ipcv-export verify" in out
    assert sorted(p.name for p in (tmp_path / "engines/tiny-internvl-dense").iterdir()) == [
        "manifest.json",
        "vision.onnx",
        "vision.onnx.data",
    ]


def test_inspect(exported, capsys):
    assert main(["inspect", str(exported)]) == 0
    out = capsys.readouterr().out
    assert "InternVL3 (internvl) vision encoder, float32" in out
    assert "keep 50% -> 33 tokens" in out
    assert "trt flavour vision.trt.onnx: ipcv nodes TokenSelect x1, NeighborIndex x1" in out
    assert main(["inspect", str(exported), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ipcv_nodes"]["ort"] == {
        "TokenSelect": 1,
        "NeighborIndex": 1,
        "NeighborReconstruct": 4,
    }
    assert data["kept_per_image"] == 33


def test_verify_passes_and_fails_with_exit_codes(exported, capsys):
    assert main(["verify", str(exported)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"TokenSelect_0:keep_idx\s+2x33\s+-\s+-\s+identical\s+ok", out)
    assert out.strip().endswith("PASS")
    assert main(["verify", str(exported), "--rtol", "1e-12", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False
    assert all(c["passed"] for c in report["ops"] if c["kind"] == "index")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "--image-size", "230x224"], "image size 230x224 does not fit Qwen2-VL"),
        (["export", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["export", "--keep-ratio", "0"], r"keep_ratio must be in \(0, 1\]"),
        (["verify", "missing-dir"], "missing-dir has no manifest.json"),
        (["inspect", "."], "has no manifest.json"),
    ],
)
def test_bad_input_one_line_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and re.search(message, err), err
    assert not any(tmp_path.iterdir())


def test_existing_out_without_force(exported, capsys):
    assert main(["export", "--model", "tiny-internvl", "--out", str(exported)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err


def test_verify_refuses_a_modified_artifact(exported, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    with (copy / "vision.onnx.data").open("r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    assert main(["verify", str(copy)]) == 2
    assert "does not match the SHA-256" in capsys.readouterr().err
