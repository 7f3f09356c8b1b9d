"""Build a TensorRT engine from an export (its TensorRT flavour) with the ipcv plugins.

Needs TensorRT (Python package), a CUDA GPU and the plugin library built from plugins/.
A cached engine is reused only when TensorRT version, GPU, graph, weights, plugin library,
precision and batch profiles are all unchanged.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ipcv_deploy.artifact import load_artifact
from ipcv_deploy.bench.report import progress
from ipcv_deploy.cli.options import add_output_args, print_json
from ipcv_deploy.trt.engine import PLUGIN_LIBRARY, PRECISIONS, BuildSettings, Profile

DEFAULT_PLUGIN = Path("build") / "plugins" / PLUGIN_LIBRARY


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``build``."""
    parser.add_argument("artifact", type=Path, help="directory written by `ipcv-export export`")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16", help="default fp16")
    parser.add_argument(
        "--profile",
        action="append",
        metavar="MIN:OPT:MAX",
        help="optimization profile over dim 0 of pixel_values, repeatable: images per call "
        "(default 1:1:4), or for a native-resolution artifact image tokens, i.e. patches per "
        "image (default: the artifact's min:example:max tokens)",
    )
    parser.add_argument(
        "--plugin",
        type=Path,
        default=DEFAULT_PLUGIN,
        help=f"plugin library (default {DEFAULT_PLUGIN})",
    )
    parser.add_argument("--out", type=Path, help="engine directory (default DIR/trt-<precision>)")
    parser.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache fits")
    add_output_args(parser)


def run(args: argparse.Namespace) -> int:
    """Check the artifact, then build or reuse the engine."""
    from ipcv_deploy.trt.builder import build_engine

    artifact = load_artifact(args.artifact, check="full")
    artifact.flavour_file("trt")
    profiles = tuple(Profile.parse(p) for p in args.profile) if args.profile else None
    settings = BuildSettings(args.precision, profiles, args.workspace_gb)
    out = args.out or args.artifact / f"trt-{args.precision}"
    engine_dir, reused = build_engine(artifact, settings, args.plugin, out, args.force, progress)
    if args.json:
        print_json({"engine_dir": str(engine_dir), "reused": reused})
    else:
        print(f"{'reused' if reused else 'built'} {engine_dir}")
    return 0
