"""``bench --native``: its table and its plot, from a report of the benchmark's own shape."""

from __future__ import annotations

import pytest

from ipcv_deploy.bench.native import native_table, parse_grid
from ipcv_deploy.bench.plot import plot_native
from ipcv_deploy.cli import main
from ipcv_deploy.errors import InputError


def _report() -> dict:
    grid = {
        "grid": [16, 16],
        "image_px": [224, 224],
        "tokens": 256,
        "kept": 89,
        "dense_ms": 40.0,
        "ipcv_ms": 20.0,
        "speedup": 2.0,
        "flop_ratio": 1.7,
        "ipcv_flop_share": 1 / 1.7,
        "ipcv_vs_dense": {"min_cosine": 0.93},
    }
    wide = {**grid, "grid": [12, 20], "image_px": [168, 280], "tokens": 240, "speedup": 2.2}
    config = {"prune_layer": 3, "keep_ratio": 0.35, "as_layers": 7, "num_neighbors": 10}
    return {
        "machine": {"cpu": "test cpu"},
        "native": [{"model": "tiny-qwen2-vl", "ipcv": config, "grids": [grid, wide]}],
    }


def test_table_rows_and_grid_parsing():
    rows = native_table(_report()["native"])
    assert rows[0][:5] == ["tiny-qwen2-vl", "16x16", "224x224", "256", "89"]
    assert rows[1][2] == "280x168" and rows[1][7] == "2.20x"
    assert parse_grid("26x46") == (26, 46) and parse_grid("32") == (32, 32)
    for bad in ("abc", "0x32", "31x32"):
        with pytest.raises(InputError, match="grid must look like 32x32"):
            parse_grid(bad)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plots" / "native.png"
    plot_native(_report(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_native_bench_refuses_a_fixed_size_model(capsys):
    assert main(["bench", "--native", "--model", "tiny-internvl"]) == 2
    assert "needs a native-resolution model (Qwen2-VL / Qwen2.5-VL)" in capsys.readouterr().err
