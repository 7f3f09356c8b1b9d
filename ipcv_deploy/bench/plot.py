"""``bench --native --plot PNG``: speed-up and FLOP ratio, drawn (matplotlib, optional extra)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ipcv_deploy.compression.cost import encoder_flops
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.errors import BackendUnavailableError
from ipcv_deploy.models import load_model

__all__ = ["KEEP_RATIOS", "plot_native"]

#: Keep ratios of the FLOP-ratio-against-keep panel.
KEEP_RATIOS = (0.2, 0.25, 0.35, 0.5, 0.65, 0.8, 1.0)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BackendUnavailableError(
            "--plot needs matplotlib: pip install 'ipcv-deploy[plot]' (or matplotlib)"
        ) from None
    return plt


def plot_native(results: dict[str, Any], path: Path) -> None:
    """Draw two panels to ``path``.

    Measured speed-up and FLOP ratio against image tokens (per model), and the analytic FLOP
    ratio against the keep ratio at each benchmarked grid.
    """
    plt = _pyplot()
    figure, (by_size, by_keep) = plt.subplots(1, 2, figsize=(11, 4.2))
    for report in results["native"]:
        rows = sorted(report["grids"], key=lambda g: g["tokens"])
        tokens = [g["tokens"] for g in rows]
        (line,) = by_size.plot(
            tokens, [g["speedup"] for g in rows], marker="o", label=f"{report['model']} measured"
        )
        by_size.plot(
            tokens,
            [g["flop_ratio"] for g in rows],
            marker="x",
            linestyle="--",
            color=line.get_color(),
            label=f"{report['model']} FLOP ratio",
        )
        loaded = load_model(report["model"], weights=False)
        adapter = loaded.adapter(loaded.vision)
        base = IPCVConfig.from_dict(report["ipcv"])
        for g in rows:
            shape = adapter.encoder_shape(tuple(g["image_px"]))
            dense = encoder_flops(shape, None, run="native_graph").total
            ratios = [
                dense
                / encoder_flops(shape, replace(base, keep_ratio=keep), run="native_graph").total
                for keep in KEEP_RATIOS
            ]
            by_keep.plot(
                KEEP_RATIOS, ratios, marker=".", label=f"{report['model']} {g['tokens']} tokens"
            )
    by_size.set(xlabel="image tokens (patches)", ylabel="dense / IPCV", xscale="log")
    by_size.set_title("ONNX Runtime CPU: speed-up vs FLOP ratio")
    by_keep.set(xlabel="keep ratio", ylabel="dense / IPCV FLOPs")
    by_keep.set_title("FLOP ratio against keep ratio (analytic)")
    for axis in (by_size, by_keep):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    machine = results.get("machine", {}).get("cpu", "")
    figure.suptitle(f"IPCV at native resolution ({machine})", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
