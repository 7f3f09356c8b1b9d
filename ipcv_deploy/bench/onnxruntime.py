"""ONNX Runtime CPU benchmark: dense export vs IPCV export, PyTorch eager dense alongside.

Each export runs in its own process (``python -m ipcv_deploy.cli export --json``), which
reports its own peak RSS; ONNX Runtime's profiler attributes node time to the ``ipcv`` ops
(inlined function nodes keep the ``_inlfunc_<OpType>`` prefix).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ipcv_deploy.artifact import Artifact, load_artifact
from ipcv_deploy.backends.onnxruntime_backend import OrtBackend
from ipcv_deploy.backends.torch_backend import RowEncoder, TorchBackend
from ipcv_deploy.bench.report import median_seconds, progress
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.errors import IpcvError
from ipcv_deploy.models import ImageSize, load_model
from ipcv_deploy.ops import OP_SPECS
from ipcv_deploy.parity import compare

__all__ = [
    "EXPORT_RSS_GOAL_GB",
    "INT8_HEADERS",
    "INT8_VARIANTS",
    "INT8_VS_FP32_DENSE_GOAL",
    "INT8_VS_INT8_DENSE_GOAL",
    "ORT_HEADERS",
    "ORT_OP_SHARE_GOAL",
    "ORT_SPEEDUP_GOAL",
    "export_in_subprocess",
    "int8_table",
    "ipcv_op_share",
    "ort_latency",
    "ort_table",
]

#: Goals: IPCV vs dense export on the first benchmark preset, the ipcv ops' share of the
#: encoder's ONNX Runtime time, the export's peak memory; with --int8, int8 IPCV against
#: int8 dense and against fp32 dense.
ORT_SPEEDUP_GOAL = 2.2
ORT_OP_SHARE_GOAL = 0.05
EXPORT_RSS_GOAL_GB = 8.0
INT8_VS_INT8_DENSE_GOAL = 2.2
INT8_VS_FP32_DENSE_GOAL = 5.0
#: The int8 variants of ``--int8``: name -> ``export --quantize`` mode, and dense or IPCV.
INT8_VARIANTS = {
    "dense_int8": ("int8", True),
    "ipcv_int8": ("int8", False),
    "ipcv_int8_full": ("int8-full", False),
}

_INLINED = re.compile(rf"^_inlfunc_({'|'.join(s.name for s in OP_SPECS)})_")


def export_in_subprocess(args: list[str], out: Path) -> dict[str, Any]:
    """``ipcv-export export ARGS --out OUT --force --json`` in a child: wall time, peak RSS.

    The peak is the child's own ``VmHWM``, which it reports in its JSON output.
    """
    command = [sys.executable, "-m", "ipcv_deploy.cli", "export", *args, "--out", str(out)]
    proc = subprocess.run(
        [*command, "--force", "--json"], stdout=subprocess.PIPE, text=True, check=False
    )
    if proc.returncode:
        raise IpcvError(f"export failed (exit {proc.returncode}): {' '.join(command)}")
    result = json.loads(proc.stdout)
    return {"seconds": result["elapsed_s"], "peak_rss_gb": result["peak_rss_gb"]}


def ipcv_op_share(artifact: Artifact, pixels: torch.Tensor, runs: int, threads: int | None):
    """Share of ONNX Runtime node time spent in the ``ipcv`` ops, per op, from its profiler."""
    prefix = str(artifact.path / "ort_profile")
    backend = OrtBackend(artifact, threads=threads, profile_prefix=prefix)
    for _ in range(runs + 1):
        backend(pixels)
    profile = Path(backend.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    runs_seen = [e for e in events if e.get("name") == "model_run"]
    first_run_end = runs_seen[0]["ts"] + runs_seen[0]["dur"] if runs_seen else 0
    per_op: dict[str, float] = {s.name: 0.0 for s in OP_SPECS}
    total = 0.0
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        if event["ts"] < first_run_end:  # the first run is warm-up
            continue
        total += event["dur"]
        match = _INLINED.match(event["name"])
        if match:
            per_op[match.group(1)] += event["dur"]
    share = {op: t / total for op, t in per_op.items()} if total else per_op
    return sum(share.values()), share


def ort_latency(
    model: str,
    config: IPCVConfig,
    image_size: ImageSize,
    workdir: Path,
    runs: int = 5,
    threads: int | None = None,
    seed: int = 0,
    int8: bool = False,
) -> dict[str, Any]:
    """Export dense and IPCV, then time both on ONNX Runtime and the dense tower in PyTorch.

    With ``int8`` also the dynamic-int8 exports of ``INT8_VARIANTS``, timed in the same run
    and verified against the fp32 PyTorch reference.

    Returns:
        JSON-ready medians (ms), speed-ups, the FLOP ratio, ``ipcv`` op share of ORT time,
        export time and peak RSS, and IPCV-vs-dense / ORT-vs-PyTorch agreement.
    """
    size = f"{image_size[0]}x{image_size[1]}"
    common = ["--model", model, "--image-size", size, "--seed", str(seed), "--target", "ort"]
    ipcv_args = [
        "--prune-layer",
        str(config.prune_layer),
        "--keep-ratio",
        repr(config.keep_ratio),
        "--as-layers",
        str(config.as_layers),
        "--num-neighbors",
        str(config.num_neighbors),
    ]
    specs = {"dense": ["--dense"], "ipcv": ipcv_args}
    if int8:
        for variant, (mode, dense) in INT8_VARIANTS.items():
            specs[variant] = [*(["--dense"] if dense else ipcv_args), "--quantize", mode]
    exports, artifacts = {}, {}
    for variant, extra in specs.items():
        out = workdir / f"{Path(model).name}-{variant}"
        progress(f"{model}: exporting {variant} to {out} ...")
        exports[variant] = export_in_subprocess([*common, *extra], out)
        artifacts[variant] = load_artifact(out, check="size")
    loaded = load_model(model, seed=seed)
    torch_dense = TorchBackend(RowEncoder(loaded, None, image_size))
    (pixels,) = torch_dense.encoder.inputs(1, seed)
    medians, all_runs, outputs = {}, {}, {}
    variants = {
        "torch_dense": torch_dense,
        **{f"ort_{v}": OrtBackend(artifacts[v], threads=threads) for v in artifacts},
    }
    for name, backend in variants.items():
        progress(f"{model}: {name} x{runs}")
        medians[name], times = median_seconds(lambda b=backend: b(pixels), runs, label=name)
        all_runs[name] = [t * 1e3 for t in times]
        outputs[name] = backend(pixels)["image_embeds"]
    del variants
    progress(f"{model}: profiling the IPCV session")
    op_share, per_op = ipcv_op_share(artifacts["ipcv"], pixels, min(runs, 3), threads)
    flops = artifacts["ipcv"].manifest.flops_per_image
    flop_ratio = flops["dense"] / flops["exported"]
    speedup = medians["ort_dense"] / medians["ort_ipcv"]
    manifest = artifacts["ipcv"].manifest
    report = {
        "model": model,
        "image_size": list(image_size),
        "tokens": [manifest.tokens_per_image, manifest.kept_per_image],
        "ipcv": config.to_dict(),
        "threads": threads or os.cpu_count(),
        "runs": runs,
        "latency_ms": {k: v * 1e3 for k, v in medians.items()},
        "all_runs_ms": all_runs,
        "speedup_ort": speedup,
        "speedup_vs_torch_dense": medians["torch_dense"] / medians["ort_ipcv"],
        "flop_ratio": flop_ratio,
        "speedup_share_of_flop_ratio": speedup / flop_ratio,
        "ipcv_op_share": op_share,
        "ipcv_op_share_by_op": per_op,
        "export": exports,
        "parity": {
            "ort_dense_vs_torch_dense": compare(
                outputs["torch_dense"], outputs["ort_dense"]
            ).to_dict(),
            "ort_ipcv_vs_ort_dense": compare(outputs["ort_dense"], outputs["ort_ipcv"]).to_dict(),
        },
    }
    if int8:
        report["int8"] = _int8_summary(artifacts, medians, flop_ratio, threads)
    return report


def _int8_summary(
    artifacts: dict[str, Artifact],
    medians: dict[str, float],
    flop_ratio: float,
    threads: int | None,
) -> dict[str, Any]:
    """Speed-ups of the int8 variants and their parity with the fp32 PyTorch reference."""
    from ipcv_deploy.backends.verify import verify_artifact

    summary: dict[str, Any] = {"flop_ratio": flop_ratio, "variants": {}}
    for variant in ("dense_int8", "ipcv_int8", "ipcv_int8_full"):
        progress(f"verifying {variant} against the fp32 PyTorch reference ...")
        report = verify_artifact(artifacts[variant], batch=1, threads=threads)
        indices = {c.name: c.mismatched for c in report.ops if c.kind == "index"}
        summary["variants"][variant] = {
            "mode": artifacts[variant].manifest.quantization["mode"],
            "ms": medians[f"ort_{variant}"] * 1e3,
            "vs_int8_dense": medians["ort_dense_int8"] / medians[f"ort_{variant}"],
            "vs_fp32_dense": medians["ort_dense"] / medians[f"ort_{variant}"],
            "output_min_cosine": report.outputs[0].cosine,
            "output_max_rel": report.outputs[0].max_rel,
            "indices_differing": indices,
            "verify_passed": report.passed,
        }
    return summary


INT8_HEADERS = [
    "model",
    "variant",
    "ms",
    "vs int8 dense",
    "vs fp32 dense",
    "cos vs fp32 torch",
    "kept differ",
    "nbr sets differ",
]


def int8_table(reports: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of ``INT8_HEADERS``: fp32 dense, int8 dense, fp32 IPCV and the int8 IPCVs."""
    rows = []
    for r in reports:
        ms, int8 = r["latency_ms"], r["int8"]["variants"]
        for label, fp32 in (("fp32 dense", "ort_dense"), ("fp32 IPCV", "ort_ipcv")):
            rows.append(
                [
                    r["model"],
                    label,
                    f"{ms[fp32]:.0f}",
                    f"{ms['ort_dense_int8'] / ms[fp32]:.2f}x",
                    f"{ms['ort_dense'] / ms[fp32]:.2f}x",
                    "1 (reference)" if fp32 == "ort_dense" else "-",
                    "-",
                    "-",
                ]
            )
        for name, v in int8.items():
            differ = v["indices_differing"]
            kept = next((n for k, n in differ.items() if k.endswith(":keep_idx")), None)
            nbr = next((n for k, n in differ.items() if k.endswith(":nbr")), None)
            rows.append(
                [
                    r["model"],
                    f"{'dense' if name.startswith('dense') else 'IPCV'} {v['mode']}",
                    f"{v['ms']:.0f}",
                    f"{v['vs_int8_dense']:.2f}x",
                    f"{v['vs_fp32_dense']:.2f}x",
                    f"{v['output_min_cosine']:.4f}",
                    "-" if kept is None else f"{kept} of {r['tokens'][1]}",
                    "-" if nbr is None else f"{nbr} of {r['tokens'][0] - r['tokens'][1]}",
                ]
            )
    return rows


ORT_HEADERS = [
    "model",
    "tokens",
    "torch dense ms",
    "ORT dense ms",
    "ORT IPCV ms",
    "IPCV speed-up",
    "FLOP ratio",
    "vs torch dense",
    "ipcv ops",
    "export RSS",
]


def ort_table(reports: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of ``ORT_HEADERS``, one per ``ort_latency`` report."""
    return [
        [
            r["model"],
            f"{r['tokens'][0]} -> {r['tokens'][1]}",
            f"{r['latency_ms']['torch_dense']:.0f}",
            f"{r['latency_ms']['ort_dense']:.0f}",
            f"{r['latency_ms']['ort_ipcv']:.0f}",
            f"{r['speedup_ort']:.2f}x",
            f"{r['flop_ratio']:.2f}x",
            f"{r['speedup_vs_torch_dense']:.2f}x",
            f"{r['ipcv_op_share']:.1%}",
            f"{r['export']['ipcv']['peak_rss_gb']:.1f} GB",
        ]
        for r in reports
    ]
