"""Prove an artifact computes what PyTorch computes: outputs and every ipcv op, on ONNX Runtime.

Seeded inputs go through the PyTorch reference (rebuilt from the manifest's source) and the
artifact's ONNX Runtime flavour (or, with --backend trt, its TensorRT engine: outputs only).
A native-resolution artifact is checked at several grids (square, 16:9, 9:16, the smallest
and largest of its range, two images in one call). --save-polygraphy DIR also writes the
first call's inputs and PyTorch outputs in polygraphy's JSON format (inputs.json,
reference.json) for `polygraphy run ... --load-inputs --load-outputs`. Exit code 1 when any
check fails.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ipcv_deploy.artifact import load_artifact
from ipcv_deploy.bench.report import format_table, progress
from ipcv_deploy.cli.options import add_output_args, print_json, require_at_least
from ipcv_deploy.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``verify``."""
    parser.add_argument("artifact", type=Path, help="directory written by `ipcv-export export`")
    parser.add_argument(
        "--batch", type=int, default=2, help="images per call (default 2; fixed-size artifacts)"
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=4096,
        help="native artifacts: the largest grid checked, in patches (default 4096)",
    )
    parser.add_argument(
        "--save-polygraphy",
        type=Path,
        metavar="DIR",
        help="write inputs.json / reference.json (polygraphy's formats) to DIR",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument(
        "--rtol", type=float, help="max |diff| / max |ref| (default 1e-5 fp32, 1e-2 half)"
    )
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    parser.add_argument(
        "--backend", choices=["ort", "trt"], default="ort", help="candidate backend (default ort)"
    )
    parser.add_argument(
        "--engine", type=Path, help="engine directory for --backend trt (default DIR/trt-fp16)"
    )
    add_output_args(parser)


def run(args: argparse.Namespace) -> int:
    """Verify, print the table (or JSON), exit 1 on any failed check."""
    from ipcv_deploy.backends.verify import verify_artifact

    require_at_least("--batch", args.batch, 1)
    if args.rtol is not None and not (args.rtol > 0 and args.rtol < float("inf")):
        raise InputError(f"--rtol must be a positive number, e.g. 1e-5; got {args.rtol:g}")
    require_at_least("--threads", args.threads, 1)
    require_at_least("--max-tokens", args.max_tokens, 4)
    progress(f"checking {args.artifact} ...")
    artifact = load_artifact(args.artifact, check="full")
    progress("running PyTorch and ONNX Runtime on the same inputs ...")
    engine = None
    if args.backend == "trt":
        engine = args.engine or args.artifact / "trt-fp16"
    report = verify_artifact(
        artifact,
        args.batch,
        args.seed,
        args.rtol,
        args.threads,
        engine,
        max_tokens=args.max_tokens,
        polygraphy_dir=args.save_polygraphy,
    )
    if args.json:
        print_json(report.to_dict())
        return 0 if report.passed else 1
    m = artifact.manifest
    tolerance = f"rtol {report.rtol:g}, identical indices"
    if report.limits:
        mode = m.quantization["mode"]
        tolerance = f"{mode} weights: row cosine >= {report.limits['min_cosine']:g}, " + (
            "indices identical (the selection runs in fp32)"
            if report.limits["index_mismatch"] == 0
            else "indices reported, not required (int8 scoring cannot promise identical indices)"
        )
    calls = "native grids, one image per call" if m.native else f"batch {report.batch}"
    print(
        f"verify {args.artifact}: {m.family}, {report.reference} vs {report.candidate}, "
        f"{calls}, seed {report.seed}; {tolerance}"
    )
    rows = [
        [
            c.name,
            "x".join(map(str, c.shape)),
            f"{c.max_rel:.2e}" if c.kind == "float" else "-",
            f"{c.cosine:.7f}" if c.kind == "float" else "-",
            "-"
            if c.kind == "float"
            else ("identical" if c.mismatched == 0 else f"{c.mismatched} differ"),
            "ok" if c.passed else "FAIL",
        ]
        for c in report.outputs + report.ops
    ]
    print(format_table(["tensor", "shape", "max rel err", "min cosine", "indices", ""], rows))
    if args.save_polygraphy:
        pg = args.save_polygraphy
        flavour = artifact.flavour_file("ort")
        print(
            f"polygraphy files in {pg}: polygraphy run {flavour} --onnxrt --load-inputs "
            f"{pg / 'inputs.json'} --load-outputs {pg / 'reference.json'}"
        )
    print("PASS" if report.passed else "FAIL")
    return 0 if report.passed else 1
