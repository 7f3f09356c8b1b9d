"""Native resolution on ONNX Runtime CPU: one dense and one IPCV export, timed at many grids.

Both artifacts are native-resolution exports (``pixel_values [num_patches, 1176]`` +
``image_grid_thw``), so every grid runs through the same two graphs; the FLOP ratio next to
each speed-up is the analytic one at that grid.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ipcv_deploy.artifact import load_artifact
from ipcv_deploy.backends.onnxruntime_backend import OrtBackend
from ipcv_deploy.bench.onnxruntime import export_in_subprocess
from ipcv_deploy.bench.report import median_seconds, progress
from ipcv_deploy.compression.cost import encoder_flops
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.errors import InputError
from ipcv_deploy.models import NATIVE_BENCHMARK_PRESETS, load_model
from ipcv_deploy.parity import compare

__all__ = [
    "NATIVE_GOALS",
    "NATIVE_GRIDS",
    "NATIVE_HEADERS",
    "NATIVE_SPEEDUP_GOAL",
    "WINDOWED_FLOP_GOAL",
    "native_latency",
    "native_table",
    "parse_grid",
]

#: Default grids (patch rows x columns): 448x448, a 16:9 image of about as many tokens
#: (644x364), about one megapixel (1008x1008).
NATIVE_GRIDS = ((32, 32), (26, 46), (72, 72))
#: Goals: the first native benchmark tower (no windows) IPCV >= 2.5x dense at ~1 MP; the
#: second (windowed attention) IPCV below 45% of dense FLOPs at every size.
NATIVE_SPEEDUP_GOAL = 2.5
WINDOWED_FLOP_GOAL = 0.45
NATIVE_GOALS = (
    f"goals: {NATIVE_BENCHMARK_PRESETS[0]} IPCV >= {NATIVE_SPEEDUP_GOAL}x dense at ~1 MP; "
    f"{NATIVE_BENCHMARK_PRESETS[1]} IPCV below {WINDOWED_FLOP_GOAL:.0%} of dense FLOPs at "
    "every size"
)
NATIVE_HEADERS = [
    "model",
    "grid",
    "image",
    "tokens",
    "kept",
    "dense ms",
    "IPCV ms",
    "speed-up",
    "FLOP ratio",
    "IPCV FLOPs",
    "cos vs dense",
]


def parse_grid(text: str) -> tuple[int, int]:
    """``"32x32"`` -> (32, 32) patch rows x columns.

    Raises:
        InputError: anything but positive sides that are multiples of 2 (the merge size).
    """
    rows, _, cols = text.lower().partition("x")
    try:
        grid = int(rows), int(cols or rows)
    except ValueError:
        grid = (0, 0)
    if min(grid) <= 0 or grid[0] % 2 or grid[1] % 2:
        raise InputError(f"grid must look like 32x32 (patch rows x columns, even), got {text!r}")
    return grid


def native_latency(
    model: str,
    config: IPCVConfig,
    grids: tuple[tuple[int, int], ...],
    workdir: Path,
    runs: int = 3,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Export dense and IPCV at native resolution (covering ``grids``), time both per grid.

    Returns:
        JSON-ready rows per grid: median ms, speed-up, FLOP ratio, IPCV share of dense
        FLOPs, output agreement with dense; export time and peak RSS.
    """
    loaded = load_model(model, seed=seed, weights=False)  # shapes only: no weights needed
    adapter = loaded.adapter(loaded.vision)
    cfg = loaded.vision.config
    patch = int(cfg.patch_size)
    largest = max(h * w for h, w in grids) * patch * patch
    smallest = min(h * w for h, w in grids) * patch * patch
    common = [
        "--model", model, "--seed", str(seed), "--target", "ort", "--image-size", "native",
        "--min-pixels", str(smallest), "--max-pixels", str(largest),
    ]  # fmt: skip
    ipcv_args = [
        "--prune-layer", str(config.prune_layer), "--keep-ratio", repr(config.keep_ratio),
        "--as-layers", str(config.as_layers), "--num-neighbors", str(config.num_neighbors),
    ]  # fmt: skip
    exports, backends = {}, {}
    for variant, extra in (("dense", ["--dense"]), ("ipcv", ipcv_args)):
        out = workdir / f"{Path(model).name}-native-{variant}"
        progress(f"{model}: exporting {variant} (native) to {out} ...")
        exports[variant] = export_in_subprocess([*common, *extra], out)
        backends[variant] = OrtBackend(load_artifact(out, check="size"), threads=threads)
    patch_dim = cfg.in_channels * cfg.temporal_patch_size * patch * patch
    rows = []
    for grid in grids:
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.randn(grid[0] * grid[1], patch_dim, generator=generator)
        grid_thw = torch.tensor([[1, *grid]])
        medians, outputs = {}, {}
        for variant, backend in backends.items():
            progress(f"{model}: {grid[0]}x{grid[1]} patches, ORT {variant} x{runs}")
            medians[variant], _ = median_seconds(
                lambda b=backend, p=pixels, g=grid_thw: b(p, g), runs, label=variant
            )
            outputs[variant] = backend(pixels, grid_thw)["image_embeds"]
        shape = adapter.encoder_shape((grid[0] * patch, grid[1] * patch))
        dense_flops = encoder_flops(shape, None, run="native_graph").total
        ipcv_flops = encoder_flops(shape, config, run="native_graph").total
        rows.append(
            {
                "grid": list(grid),
                "image_px": [grid[0] * patch, grid[1] * patch],
                "tokens": shape.tokens,
                "kept": config.kept_count(shape.tokens),
                "dense_ms": medians["dense"] * 1e3,
                "ipcv_ms": medians["ipcv"] * 1e3,
                "speedup": medians["dense"] / medians["ipcv"],
                "flop_ratio": dense_flops / ipcv_flops,
                "ipcv_flop_share": ipcv_flops / dense_flops,
                "ipcv_vs_dense": compare(outputs["dense"], outputs["ipcv"]).to_dict(),
            }
        )
    return {
        "model": model,
        "ipcv": config.to_dict(),
        "threads": threads or os.cpu_count(),
        "runs": runs,
        "export": exports,
        "grids": rows,
    }


def native_table(reports: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of ``NATIVE_HEADERS``."""
    return [
        [
            r["model"],
            f"{g['grid'][0]}x{g['grid'][1]}",
            f"{g['image_px'][1]}x{g['image_px'][0]}",
            str(g["tokens"]),
            str(g["kept"]),
            f"{g['dense_ms']:.0f}",
            f"{g['ipcv_ms']:.0f}",
            f"{g['speedup']:.2f}x",
            f"{g['flop_ratio']:.2f}x",
            f"{g['ipcv_flop_share']:.1%}",
            f"{g['ipcv_vs_dense']['min_cosine']:.3f}",
        ]
        for r in reports
        for g in r["grids"]
    ]
