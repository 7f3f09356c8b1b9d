"""Every verb through main(), once through the installed script, the README commands, and
bad input: one ``error:`` line, exit 2, nothing written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ipcv_deploy.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_demo_json(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--json", "--runs", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    onnx = result["onnx"]
    assert onnx["parity_passed"] and onnx["indices_identical"] and onnx["max_rel_err"] < 1e-5
    assert (tmp_path / onnx["artifact"] / "manifest.json").is_file()
    assert result["model"] == "tiny-qwen2-vl"
    assert result["tokens_per_image"] == 256 and result["kept_per_image"] == 89
    assert 0.5 < result["agreement"]["cosine"] < 1.0
    assert 0.4 < result["flops_per_image"]["ipcv_share_of_dense"] < 0.8
    assert set(result["latency_ms"]) == {"dense", "ipcv"}


def test_demo_table_internvl(capsys):
    assert (
        main(
            [
                "demo",
                "--model",
                "tiny-internvl",
                "--batch",
                "2",
                "--runs",
                "1",
                "--keep-ratio",
                "0.5",
                "--no-export",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "IPCV demo: tiny-internvl (InternVL3), 112x112, batch 2" in out
    assert "keep 50% (65 -> 33 tokens per image)" in out
    assert re.search(r"output vs dense: cosine 0\.\d+", out)


def test_bench_flops(tmp_path, capsys):
    out = tmp_path / "flops.json"
    assert main(["bench", "--flops", "--model", "qwen2-vl-7b-vit", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "IPCV (reference-code AS)" in printed and "41.3%" in printed
    report = json.loads(out.read_text())
    assert report["flops"][0]["share_of_dense"]["ipcv"]["blocks"] == pytest.approx(0.413, abs=0.002)


def test_bench_latency_tiny(tmp_path, capsys):
    out = tmp_path / "lat.json"
    args = [
        "bench",
        "--latency",
        "--model",
        "tiny-internvl",
        "--runs",
        "2",
        "--out",
        str(out),
        "--json",
    ]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    row = printed["latency"][0]
    assert row["speedup"] > 0 and row["flop_ratio"] > 1 and len(row["all_runs_ms"]["ipcv"]) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--keep-ratio", "1.5"], r"keep_ratio must be in \(0, 1\], got 1.5"),
        (["demo", "--reduction", "1.2"], r"reduction must be in \[0, 1\)"),
        (["demo", "--prune-layer", "1"], r"prune_layer \(K\) must be >= 2, got 1"),
        (["demo", "--prune-layer", "12"], r"must be < the encoder depth 12, got 12"),
        (["demo", "--as-layers", "-1"], "as_layers must be >= 0"),
        (["demo", "--num-neighbors", "0"], r"num_neighbors \(k\) must be >= 1"),
        (["demo", "--model", "llava-7b"], "unknown model 'llava-7b': not a built-in preset"),
        (["demo", "--image-size", "450x448"], "image size 450x448 does not fit Qwen2-VL"),
        (["demo", "--image-size", "big"], "image size must look like 448x448"),
        (["bench", "--model", "tiny-internvl"], "pick at least one benchmark"),
    ],
)
def test_bad_input_one_line_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and re.search(message, err), err
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_checkpoint_dir_with_bin_weights(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert main(["demo", "--model", str(tmp_path)]) == 2
    assert "has no .safetensors weights" in capsys.readouterr().err


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- setup -->\n```bash\n(.*?)```", text, re.S)
    assert block, "README lost its set-up block"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_has_the_two_setup_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert "ipcv-export demo" in commands[0]
    assert "pytest" in commands[1]


def test_installed_script_runs_demo(tmp_path):
    """The console script, as the README's first command uses it (without re-installing)."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ipcv-export"), "demo", "--json", "--runs", "1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["family"] == "Qwen2-VL"
    help_proc = subprocess.run(
        [str(Path(sys.executable).parent / "ipcv-export"), "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "demo" in help_proc.stdout and "bench" in help_proc.stdout
