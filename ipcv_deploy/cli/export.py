"""Export the vision encoder (IPCV-compressed, or dense) to an ONNX artifact directory.

Writes vision.onnx (ONNX Runtime flavour: ipcv ops with standard-op function bodies),
vision.trt.onnx (TensorRT flavour: plugin attributes, no bodies), shared external weights
and manifest.json, atomically. Qwen families export at native resolution by default (the
tower's own pixel_values [num_patches, 1176] + image_grid_thw, any grid within --min-pixels /
--max-pixels); --image-size HxW exports a static size with a dynamic batch (the only form of
the fixed-size families, whose dynamic batch is the processor's tiles / images).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ipcv_deploy.artifact import (
    MANIFEST_NAME,
    PACKAGE_NAME,
    QUANTIZE_MODES,
    Artifact,
    load_artifact,
)
from ipcv_deploy.bench.report import peak_rss_gb, progress
from ipcv_deploy.cli.options import (
    add_ipcv_args,
    add_model_args,
    add_output_args,
    ipcv_config,
    parse_image_size,
    print_json,
    require_at_least,
)
from ipcv_deploy.errors import ConfigError
from ipcv_deploy.fileio import check_replaceable
from ipcv_deploy.models import LoadedModel, load_model, native_families, parse_dtype
from ipcv_deploy.models.ort_genai import genai_families

if TYPE_CHECKING:  # the export package imports onnx: only when a command runs
    from ipcv_deploy.export import ExportOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``export``."""
    add_model_args(parser)
    add_ipcv_args(parser)
    parser.add_argument("--dense", action="store_true", help="export without IPCV (baseline)")
    parser.add_argument(
        "--out", type=Path, help="artifact directory (default: engines/<model>-<ipcv|dense>)"
    )
    parser.add_argument(
        "--format",
        choices=["onnx", "ort-genai"],
        default="onnx",
        help="onnx: the vision-encoder artifact (default); ort-genai: a folder ONNX Runtime "
        "GenAI loads as is (this vision encoder, an embedding model, the text decoder from "
        f"onnxruntime_genai.models.builder, genai_config.json, tokenizer, processor; "
        f"{genai_families()}; needs onnxruntime-genai)",
    )
    parser.add_argument(
        "--vision-artifact",
        type=Path,
        help="with --format ort-genai: package this native vision export of --model (its "
        "IPCV settings and pixel range) instead of exporting the encoder again",
    )
    parser.add_argument(
        "--target",
        choices=["ort", "trt", "all"],
        help="ort: function bodies for any ONNX runtime; trt: TensorRT plugin nodes; "
        "all: both, sharing one weights file (default; ort with --quantize int8)",
    )
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        default="none",
        help="dynamic int8 weights for ONNX Runtime CPU (ipcv ops stay fp32): int8 keeps the "
        "blocks before the selection fp32 (same kept tokens as fp32), int8-full quantizes "
        "them too (faster, kept tokens may differ)",
    )
    parser.add_argument(
        "--return-indices", action="store_true", help="also output the kept indices [B, P]"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    native = parser.add_argument_group(f"native resolution ({native_families()})")
    native.add_argument(
        "--min-pixels",
        type=int,
        help="smallest image (H*W) the export takes (default: the checkpoint processor's "
        "min_pixels, else the family processor's default)",
    )
    native.add_argument(
        "--max-pixels",
        type=int,
        help="largest image (H*W) the export takes (default: the checkpoint processor's "
        "max_pixels, else the family processor's default)",
    )
    add_output_args(parser)


def _processor_pixels(model: str) -> tuple[int | None, int | None]:
    """Min / max pixels from a checkpoint directory's ``preprocessor_config.json``."""
    path = Path(model) / "preprocessor_config.json"
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, None
    size = data.get("size") if isinstance(data.get("size"), dict) else {}
    return (
        data.get("min_pixels") or size.get("shortest_edge"),
        data.get("max_pixels") or size.get("longest_edge"),
    )


def _native_range(args: argparse.Namespace, loaded: LoadedModel):
    """The pixel range of a native export, or ``None`` for a static one.

    Raises:
        ConfigError: ``--image-size native`` or pixel bounds for a fixed-size family, or
            bounds out of order.
    """
    from ipcv_deploy.export import PixelRange

    wants_native = args.image_size is None or args.image_size.lower() == "native"
    bounds = args.min_pixels is not None or args.max_pixels is not None
    if not loaded.adapter.native_resolution:
        if (args.image_size and args.image_size.lower() == "native") or bounds:
            raise ConfigError(
                f"{loaded.adapter.family} takes images of one size: native resolution "
                f"(--image-size native, --min-pixels, --max-pixels) is for {native_families()}; "
                "drop them (its processor's tiles are the dynamic batch)"
            )
        return None
    if not wants_native:
        if bounds:
            raise ConfigError(
                "--min-pixels / --max-pixels bound a native-resolution export; drop "
                "--image-size (or pass --image-size native) to use them"
            )
        return None
    low, high = _processor_pixels(args.model)
    default_low, default_high = loaded.adapter.native_pixels
    low = args.min_pixels or low or default_low
    high = args.max_pixels or high or default_high
    require_at_least("--min-pixels", low, 1)
    if high < low:
        raise ConfigError(f"--max-pixels {high} is below --min-pixels {low}; swap or widen them")
    return PixelRange(int(low), int(high))


def default_out(model: str, dense: bool, package: bool = False) -> Path:
    """``engines/<model name>-<ipcv|dense>[-ort-genai]``."""
    suffix = "-ort-genai" if package else ""
    return Path("engines") / f"{Path(model).name}-{'dense' if dense else 'ipcv'}{suffix}"


def _export_quantized(
    loaded: LoadedModel, options: ExportOptions, out: Path, mode: str, force: bool
) -> Artifact:
    """The fp32 export in a hidden sibling, the model freed, then its int8 quantization."""
    from ipcv_deploy.export import export_encoder
    from ipcv_deploy.export.quantize import quantize_artifact

    fp32 = out.parent / f".{out.name}.fp32-{os.getpid()}"
    try:
        artifact = export_encoder(loaded, options, fp32, progress=progress)
        loaded.model = loaded.vision = None  # the quantizer needs the memory
        gc.collect()
        return quantize_artifact(artifact, out, mode, force, progress)
    finally:
        shutil.rmtree(fp32, ignore_errors=True)


def _export_package(
    args: argparse.Namespace,
    loaded: LoadedModel,
    options: ExportOptions,
    out: Path,
    started: float,
) -> int:
    """``--format ort-genai``: the package, then what was written."""
    from ipcv_deploy.export.ort_genai import export_ort_genai

    vision = None if args.vision_artifact is None else load_artifact(args.vision_artifact)
    package = export_ort_genai(loaded, options, out, progress=progress, vision_artifact=vision)
    elapsed = time.perf_counter() - started
    if args.json:
        print_json({"package": str(out), "elapsed_s": elapsed, **package.data})
        return 0
    llm = package.data["llm"]
    print(f"exported an ONNX Runtime GenAI package of {loaded.name} to {out} in {elapsed:.1f} s")
    print(
        f"  vision: {package.data['vision']}/vision.onnx "
        + ("(dense)" if package.vision.manifest.ipcv is None else "(IPCV)")
        + f"; text decoder: {llm['num_hidden_layers']} layers, {llm['hidden_size']} wide"
    )
    print(f"next: ipcv-export run --llm-backend ort-genai --artifact {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Load the model, export, print what was written."""
    from ipcv_deploy.export import ExportOptions, export_encoder

    started = time.perf_counter()
    package = args.format == "ort-genai"
    out = args.out or default_out(args.model, args.dense, package)
    check_replaceable(out, args.force, PACKAGE_NAME if package else MANIFEST_NAME)  # before work
    if args.quantize != "none" and args.target not in (None, "ort"):
        raise ConfigError(
            f"--quantize {args.quantize} is for ONNX Runtime (CPU); TensorRT builds its own "
            "reduced precision (build --precision): pass --target ort or leave --target out"
        )
    if args.vision_artifact is not None and not package:
        raise ConfigError(
            "--vision-artifact names the encoder of an ONNX Runtime GenAI package: add "
            "--format ort-genai"
        )
    if package and (args.quantize != "none" or args.target):
        raise ConfigError(
            "--format ort-genai writes the fp32 ONNX Runtime flavour; drop --quantize / --target"
        )
    if args.dense and args.return_indices:
        raise ConfigError(
            "--return-indices outputs the kept indices, which a --dense export does not have; "
            "drop one of the two"
        )
    progress(f"loading {args.model} ...")
    loaded = load_model(args.model, parse_dtype(args.dtype), args.seed)
    native = _native_range(args, loaded)
    static = args.image_size and native is None
    image_size = parse_image_size(args.image_size) if static else loaded.image_size
    config = None if args.dense else ipcv_config(args, loaded.adapter)
    if package:
        return _export_package(
            args,
            loaded,
            ExportOptions(
                image_size, config, "ort", args.return_indices, args.force, native=native
            ),
            out,
            started,
        )
    if args.quantize == "none":
        target = args.target or "all"
        options = ExportOptions(
            image_size, config, target, args.return_indices, args.force, native=native
        )
        artifact = export_encoder(loaded, options, out, progress=progress)
    else:
        options = ExportOptions(
            image_size, config, "ort", args.return_indices, force=True, native=native
        )
        artifact = _export_quantized(loaded, options, out, args.quantize, args.force)
    elapsed = time.perf_counter() - started
    if args.json:
        summary = {"artifact": str(out), "elapsed_s": elapsed, "peak_rss_gb": peak_rss_gb()}
        print_json({**summary, **artifact.manifest.to_dict()})
        return 0
    m = artifact.manifest
    print(f"exported {m.family} encoder to {out} in {elapsed:.1f} s")
    if m.native:
        n = m.native
        print(
            f"  native resolution: any grid of {n['min_tokens']}..{n['max_tokens']} patches "
            f"({n['min_pixels']}..{n['max_pixels']} px, sides multiples of "
            f"{n['patch_size'] * n['merge_size']} px), one image per call; at the example size"
        )
    print(
        f"  {m.image_size[0]}x{m.image_size[1]}: {m.tokens_per_image} -> {m.kept_per_image} "
        f"tokens per image, {m.flops_per_image['exported'] / m.flops_per_image['dense']:.1%} "
        "of dense FLOPs"
    )
    if m.quantization:
        q = m.quantization
        print(
            f"  {q['mode']}: {q['int8_matmuls']} weight MatMuls int8 ({q['weights']}), "
            f"{q['fp32_matmuls']} fp32" + (f" ({q['fp32_reason']})" if q["fp32_reason"] else "")
        )
    for flavour, name in m.flavours.items():
        print(f"  {flavour}: {name}")
    print(f"next: ipcv-export verify {out}")
    return 0
