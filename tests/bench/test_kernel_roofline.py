"""The kernel roofline: op costs from first principles, the floor per GPU, and the CLI table."""

from __future__ import annotations

import json

import pytest
import torch

from ipcv_deploy.bench.kernels import (
    GPUS,
    KERNEL_IMAGE_SIZES,
    KernelShape,
    kernel_report,
    kernel_shapes,
    op_cost,
)
from ipcv_deploy.cli import main


def test_shapes_follow_the_qwen2_vl_7b_geometry():
    shapes = kernel_shapes()
    assert [s.tokens for s in shapes] == [(h // 14) * (w // 14) for h, w in KERNEL_IMAGE_SIZES]
    assert all(s.width == 1280 and s.prefix == 0 and s.neighbors == 10 for s in shapes)
    assert [s.kept for s in shapes] == [int(s.tokens * 0.35) for s in shapes]


def test_op_costs():
    shape = KernelShape("x", tokens=100, width=8, kept=30, neighbors=4, prefix=0)
    # TokenSelect: both hidden states read (fp16), N indices written
    assert op_cost("TokenSelect", shape, 2) == (2 * 100 * 8 * 2 + 100 * 8, 3 * 100 * 8)
    # NeighborIndex: the R x P x D GEMM dominates
    nbytes, flops = op_cost("NeighborIndex", shape, 4)
    assert nbytes == 100 * 8 * 4 + 70 * 4 * 8 and flops == 2 * 70 * 30 * 8 + 3 * 100 * 8
    with pytest.raises(ValueError, match="unknown op"):
        op_cost("TopK", shape, 2)


def test_floors_are_the_slower_of_bandwidth_and_compute():
    report = kernel_report(measure=False)
    for row in report["rows"]:
        for gpu, (bandwidth, peak) in GPUS.items():
            want = max(row["bytes"] / bandwidth, row["flops"] / peak) * 1e3
            assert row["floor_ms"][gpu] == pytest.approx(want)
        assert "kernel_ms" not in row
    # the 4 MP distance GEMM is compute-bound on every GPU listed
    big = next(r for r in report["rows"] if r["op"] == "NeighborIndex" and r["tokens"] > 20000)
    assert all(big["flops"] / GPUS[g][1] > big["bytes"] / GPUS[g][0] for g in GPUS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the CLI also measures")
def test_bench_kernels_prints_floors_and_writes_json(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert main(["bench", "--kernels", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no CUDA GPU here: floors only" in printed and "floor Jetson AGX Orin ms" in printed
    report = json.loads(out.read_text())["kernels"]
    assert report["gpu"] is None and len(report["rows"]) == 3 * len(KERNEL_IMAGE_SIZES)


def test_gpu_check_refuses_without_a_gpu_and_reads_pytest_results(tmp_path):
    from ipcv_deploy.bench import gpu_check

    if not torch.cuda.is_available():
        assert gpu_check.main(["--out", str(tmp_path / "g.json")]) == 2
        assert not (tmp_path / "g.json").exists()
    suite = tmp_path / "test_two.py"
    suite.write_text("def test_passes():\n    pass\n\n\ndef test_fails():\n    assert 1 == 2\n")
    result = gpu_check._pytest([str(suite)], tmp_path / "junit.xml")
    assert result["returncode"] == 1 and (result["tests"], result["failures"]) == (2, 1)
    assert [name.rsplit("::", 1)[1] for name in result["failed"]] == ["test_fails"]
