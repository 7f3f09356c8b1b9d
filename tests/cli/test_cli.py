"""Every verb through main(), once through the installed script, the README commands, and
bad input: one ``error:`` line, exit 2, nothing written."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipcv_deploy.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY_QWEN = ["demo", "--model", "tiny-qwen2-vl"]


def test_demo_json(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--model", "tiny-qwen2-vl", "--json", "--runs", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    onnx = result["onnx"]
    assert onnx["parity_passed"] and onnx["indices_identical"] and onnx["max_rel_err"] < 1e-5
    assert (tmp_path / onnx["artifact"] / "manifest.json").is_file()
    assert result["model"] == "tiny-qwen2-vl"
    assert result["tokens_per_image"] == 256 and result["kept_per_image"] == 89
    assert 0.5 < result["agreement"]["cosine"] < 1.0
    assert 0.4 < result["flops_per_image"]["ipcv_share_of_dense"] < 0.8
    assert set(result["latency_ms"]) == {"dense", "ipcv"}


def test_demo_default_is_the_small_model_at_native_448(capsys):
    """The README's main job: a model where IPCV saves more than half the FLOPs."""
    assert main(["demo", "--json", "--runs", "1", "--no-export"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "small-qwen2-vl" and result["image_size"] == [448, 448]
    assert (result["tokens_per_image"], result["kept_per_image"]) == (1024, 358)
    assert result["flops_per_image"]["ipcv_share_of_dense"] < 0.45


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
        ([*TINY_QWEN, "--prune-layer", "12"], r"must be < the encoder depth 12, got 12"),
        (["demo", "--as-layers", "-1"], "as_layers must be >= 0"),
        (["demo", "--num-neighbors", "0"], r"num_neighbors \(k\) must be >= 1"),
        (["demo", "--model", "llava-7b"], "unknown model 'llava-7b': not a built-in preset"),
        (["demo", "--image-size", "450x448"], "image size 450x448 does not fit Qwen2-VL"),
        (["demo", "--image-size", "big"], "image size must look like 448x448"),
        (["bench", "--model", "tiny-internvl"], "pick at least one benchmark"),
        ([*TINY_QWEN, "--as-layers", "10"], r"as_layers=10 runs past the encoder.*at most 9"),
        (
            ["export", *TINY_QWEN[1:], "--num-neighbors", "90"],
            r"num_neighbors \(k\) = 90 exceeds the 89 tokens kept per image",
        ),
        (["export", "--image-size", "100016x100016"], r"gives 51\d+ patches per image"),
        (["export", "--dense", "--return-indices"], "a --dense export does not have"),
        (["export", *TINY_QWEN[1:], "--selection", "global"], "holds one image per row"),
        (["demo", "--selection", "global"], "pass --no-export"),
        (["demo", "--runs", "0"], "--runs must be at least 1, got 0"),
        (["demo", "--batch", "0"], "--batch must be at least 1, got 0"),
        (["verify", "somewhere", "--rtol", "-1"], "--rtol must be a positive number"),
        (["eval", "data.jsonl", "--limit", "0"], "--limit must be at least 1, got 0"),
    ],
)
def test_bad_input_one_line_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and re.search(message, err), err
    assert not any(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("kind", ["user directory", "file"])
def test_export_force_never_replaces_what_it_did_not_write(kind, tmp_path, capsys):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("my notes")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("my notes")
    argv = ["export", "--model", "tiny-qwen2-vl", "--out", str(out), "--force"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "refusing to replace it" in err[-1], err
    assert not any(line.startswith("loading") for line in err)  # refused before any work
    kept = out if kind == "file" else out / "notes.txt"
    assert kept.read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no hidden leftovers


def test_ctrl_c_exits_130_with_one_line_and_leaves_nothing(tmp_path):
    """SIGINT in the middle of an export: exit 130, one line, no partial directory."""
    script = Path(sys.executable).parent / "ipcv-export"
    argv = [str(script), "export", "--model", "tiny-qwen2-vl", "--out", str(tmp_path / "out")]
    proc = subprocess.Popen(argv, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, "export never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted"), err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


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
        [
            str(Path(sys.executable).parent / "ipcv-export"),
            *TINY_QWEN,
            "--json",
            "--runs",
            "1",
            "--no-export",  # test_demo_json runs the export, in process
        ],
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
