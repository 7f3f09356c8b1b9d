"""PyTorch latency of a vision tower, dense vs IPCV, next to the FLOP ratio."""

from __future__ import annotations

from typing import Any

import torch

from ipcv_deploy.api import apply_ipcv, remove_ipcv
from ipcv_deploy.bench.flops import flops_report
from ipcv_deploy.bench.report import median_seconds, progress
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.models import ImageSize, LoadedModel, synchronize
from ipcv_deploy.parity import compare

__all__ = ["LATENCY_GOAL", "LATENCY_HEADERS", "latency_table", "torch_latency"]

#: Goal: the measured speed-up is at least this share of the FLOP ratio.
LATENCY_GOAL = 0.85


def torch_latency(
    loaded: LoadedModel,
    config: IPCVConfig,
    image_size: ImageSize,
    batch: int = 1,
    runs: int = 5,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Median eager latency of the dense and the IPCV tower on the same seeded inputs.

    Runs where the tower is (``loaded`` placed by ``load_model(..., device=)``); on CUDA each
    timed call waits for the GPU.

    Returns:
        A JSON-ready dict: medians and all run times (ms), speed-up, FLOP ratio, the speed-up
        as a share of the FLOP ratio, and dense-vs-IPCV agreement of the output features.
    """
    adapter = loaded.adapter(loaded.vision)
    args, kwargs = adapter.example_inputs(image_size, batch, torch.Generator().manual_seed(seed))
    vision = loaded.vision
    device = adapter.device

    def call() -> Any:
        out = vision(*args, **kwargs)
        synchronize(device)
        return out

    remove_ipcv(vision)
    outputs = {}
    times: dict[str, list[float]] = {}
    medians: dict[str, float] = {}
    with torch.inference_mode():
        for variant in ("dense", "ipcv"):
            if variant == "ipcv":
                apply_ipcv(vision, config)
            progress(
                f"{loaded.name}: {variant} x{runs} (batch {batch}, {image_size[0]}x{image_size[1]})"
            )
            medians[variant], times[variant] = median_seconds(call, runs, warmup, label=variant)
            outputs[variant] = adapter.features(call())
    remove_ipcv(vision)
    flops = flops_report(adapter, image_size, config)
    flop_ratio = 1.0 / flops["share_of_dense"]["ipcv"]["total"]
    speedup = medians["dense"] / medians["ipcv"]
    return {
        "model": loaded.name,
        "dtype": str(adapter.dtype).removeprefix("torch."),
        "device": str(device),
        "image_size": list(image_size),
        "batch": batch,
        "runs": runs,
        "ipcv": config.to_dict(),
        "latency_ms": {k: v * 1e3 for k, v in medians.items()},
        "all_runs_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
        "speedup": speedup,
        "flop_ratio": flop_ratio,
        "speedup_share_of_flop_ratio": speedup / flop_ratio,
        "parity_dense_vs_ipcv": compare(outputs["dense"], outputs["ipcv"]).to_dict(),
    }


LATENCY_HEADERS = [
    "model",
    "image",
    "batch",
    "dense ms",
    "IPCV ms",
    "speed-up",
    "FLOP ratio",
    "of FLOP ratio",
    "cos vs dense",
]


def latency_table(reports: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of ``LATENCY_HEADERS``, one per ``torch_latency`` report."""
    return [
        [
            r["model"],
            f"{r['image_size'][0]}x{r['image_size'][1]}",
            r["batch"],
            f"{r['latency_ms']['dense']:.0f}",
            f"{r['latency_ms']['ipcv']:.0f}",
            f"{r['speedup']:.2f}x",
            f"{r['flop_ratio']:.2f}x",
            f"{r['speedup_share_of_flop_ratio'] * 100:.0f}%",
            f"{r['parity_dense_vs_ipcv']['cosine']:.4f}",
        ]
        for r in reports
    ]
