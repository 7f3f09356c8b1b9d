"""The whole chain on one model: IPCV in PyTorch, ONNX export, ONNX Runtime parity and time.

Compresses the encoder with IPCV and shows dense vs IPCV agreement, FLOPs and PyTorch time;
then exports the IPCV encoder (engines/demo/<model>), verifies ONNX Runtime against PyTorch
and times it. Runs on the built-in tiny Qwen2-VL by default (seeded random weights, no
download); pass --model with another preset or a local checkpoint directory.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ipcv_deploy.api import apply_ipcv, remove_ipcv
from ipcv_deploy.bench.flops import flops_report
from ipcv_deploy.bench.report import format_table, machine_info, median_seconds, progress
from ipcv_deploy.cli.options import (
    add_device_args,
    add_ipcv_args,
    add_model_args,
    add_output_args,
    ipcv_config,
    parse_image_size,
    print_json,
    require_at_least,
)
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.errors import ConfigError
from ipcv_deploy.models import ImageSize, LoadedModel, load_model, parse_dtype, synchronize
from ipcv_deploy.parity import compare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``demo``."""
    add_model_args(parser)
    add_device_args(parser)
    add_ipcv_args(parser)
    parser.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per variant (median)")
    parser.add_argument(
        "--no-export", action="store_true", help="skip the ONNX export and ONNX Runtime steps"
    )
    add_output_args(parser)


def run(args: argparse.Namespace) -> int:
    """Build or load the model, run dense and IPCV on the same inputs, report."""
    started = time.perf_counter()
    require_at_least("--runs", args.runs, 1)
    require_at_least("--batch", args.batch, 1)
    progress(f"loading {args.model} ...")
    loaded = load_model(args.model, parse_dtype(args.dtype), args.seed, device=args.device)
    adapter = loaded.adapter(loaded.vision)
    image_size = parse_image_size(args.image_size) if args.image_size else loaded.image_size
    adapter.check_image_size(image_size)
    config = ipcv_config(args, loaded.adapter)
    adapter.check_config(config, image_size)
    if config.selection != "per_image" and not args.no_export:
        raise ConfigError(
            f"the ONNX export selects per image, not {config.selection!r}; pass --no-export to "
            "compare global selection in PyTorch only"
        )
    inputs, kwargs = adapter.example_inputs(
        image_size, args.batch, torch.Generator().manual_seed(args.seed)
    )
    vision = loaded.vision
    device = adapter.device  # the inputs are made there

    def call() -> object:
        out = vision(*inputs, **kwargs)
        synchronize(device)
        return out

    remove_ipcv(vision)
    latency, features = {}, {}
    with torch.inference_mode():
        for variant in ("dense", "ipcv"):
            if variant == "ipcv":
                apply_ipcv(vision, config)
            progress(f"running {variant} x{args.runs} ...")
            latency[variant], _ = median_seconds(call, args.runs)
            features[variant] = adapter.features(call()).cpu()
    flops = flops_report(adapter, image_size, config)
    agreement = compare(features["dense"], features["ipcv"])
    result = {
        "model": loaded.name,
        "family": loaded.adapter.family,
        "dtype": args.dtype,
        "device": str(device),
        "image_size": list(image_size),
        "batch": args.batch,
        "ipcv": config.to_dict(),
        "tokens_per_image": flops["tokens_per_image"],
        "kept_per_image": flops["kept_per_image"],
        "agreement": agreement.to_dict(),
        "flops_per_image": {
            "dense": flops["flops"]["dense"]["total"],
            "ipcv": flops["flops"]["ipcv"]["total"],
            "ipcv_share_of_dense": flops["share_of_dense"]["ipcv"]["total"],
        },
        "latency_ms": {k: v * 1e3 for k, v in latency.items()},
        "speedup": latency["dense"] / latency["ipcv"],
        "onnx": None if args.no_export else _export_and_verify(loaded, config, image_size, args),
        "elapsed_s": time.perf_counter() - started,
        "machine": machine_info(),
    }
    code = 0 if result["onnx"] is None or result["onnx"]["parity_passed"] else 1
    if args.json:
        print_json(result)
        return code
    _print(result, args.runs)
    return code


def _export_and_verify(
    loaded: LoadedModel, config: IPCVConfig, image_size: ImageSize, args: argparse.Namespace
) -> dict:
    from ipcv_deploy.backends.onnxruntime_backend import OrtBackend
    from ipcv_deploy.backends.verify import verify_artifact
    from ipcv_deploy.export import ExportOptions, export_encoder

    out = Path("engines") / "demo" / f"{Path(loaded.name).name}-ipcv"
    # the export (and ONNX Runtime) is CPU work
    (loaded.model if loaded.model is not None else loaded.vision).to("cpu")
    options = ExportOptions(image_size, config, target="all", force=True)
    artifact = export_encoder(loaded, options, out, progress=progress)
    progress("verifying ONNX Runtime against PyTorch ...")
    report = verify_artifact(artifact, batch=max(args.batch, 2), seed=args.seed)
    backend = OrtBackend(artifact)
    pixels = loaded.adapter(loaded.vision).row_inputs(
        image_size, args.batch, torch.Generator().manual_seed(args.seed)
    )
    seconds, _ = median_seconds(lambda: backend(pixels), args.runs)
    return {
        "artifact": str(out),
        "parity_passed": report.passed,
        "max_rel_err": max(c.max_rel for c in report.outputs + report.ops),
        "indices_identical": all(c.mismatched == 0 for c in report.outputs + report.ops),
        "ort_ipcv_ms": seconds * 1e3,
    }


def _print(r: dict, runs: int) -> None:
    cfg = r["ipcv"]
    h, w = r["image_size"]
    print(
        f"IPCV demo: {r['model']} ({r['family']}), {h}x{w}, batch {r['batch']}, {r['dtype']} "
        f"on {r['device']}"
    )
    print(
        f"IPCV: K={cfg['prune_layer']}, keep {cfg['keep_ratio']:.0%} "
        f"({r['tokens_per_image']} -> {r['kept_per_image']} tokens per image), "
        f"AS={cfg['as_layers']} blocks, k={cfg['num_neighbors']}, {cfg['selection']} selection"
    )
    f, lat = r["flops_per_image"], r["latency_ms"]
    rows = [
        [
            "GFLOPs per image",
            f"{f['dense'] / 1e9:.3f}",
            f"{f['ipcv'] / 1e9:.3f}",
            f"{1 / f['ipcv_share_of_dense']:.2f}x",
        ],
        [
            f"latency, median of {runs}",
            f"{lat['dense']:.1f} ms",
            f"{lat['ipcv']:.1f} ms",
            f"{r['speedup']:.2f}x",
        ],
    ]
    print(format_table(["", "dense", "IPCV", "dense / IPCV"], rows))
    a = r["agreement"]
    print(
        f"output vs dense: cosine {a['cosine']:.4f}, max abs err {a['max_abs']:.3g}, "
        f"max rel err {a['max_rel']:.3g}"
    )
    if r["onnx"]:
        o = r["onnx"]
        print(
            f"ONNX export: {o['artifact']}; ONNX Runtime vs PyTorch: "
            f"{'PASS' if o['parity_passed'] else 'FAIL'} (max rel err {o['max_rel_err']:.1e}, "
            f"kept indices {'identical' if o['indices_identical'] else 'DIFFER'}), "
            f"ONNX Runtime IPCV {o['ort_ipcv_ms']:.1f} ms"
        )
    print(
        f"done in {r['elapsed_s']:.1f} s on {r['machine']['cpu']} "
        f"({r['machine']['torch_threads']} threads)"
    )
