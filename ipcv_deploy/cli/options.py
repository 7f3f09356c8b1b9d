"""Option groups shared by the verbs, so a flag means the same in every command."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ipcv_deploy.cli.common import add_output_args, print_json, require_at_least
from ipcv_deploy.config import SELECTION_MODES, IPCVConfig
from ipcv_deploy.errors import InputError
from ipcv_deploy.models import DEFAULT_PRESET, DEVICES, DTYPES, PRESETS, FamilyAdapter, ImageSize

__all__ = [
    "add_device_args",
    "add_ipcv_args",
    "add_model_args",
    "add_output_args",
    "ipcv_config",
    "parse_image_size",
    "print_json",
    "require_at_least",
]


def parse_image_size(text: str) -> ImageSize:
    """``"448x448"`` (height x width) or ``"448"`` to a (height, width) pair.

    Raises:
        InputError: on anything else.
    """
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes, default=0) <= 0:
        raise InputError(f"image size must look like 448x448 (height x width), got {text!r}")
    return (sizes[0], sizes[-1])


def add_model_args(parser: argparse.ArgumentParser, default: str | None = DEFAULT_PRESET) -> None:
    """``--model``, ``--image-size``, ``--dtype``, ``--seed``."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=default,
        help=f"built-in preset ({', '.join(PRESETS)}) or a local Hugging Face checkpoint "
        f"directory (safetensors); default: {default}",
    )
    group.add_argument(
        "--image-size",
        help="HxW of each image / tile, e.g. 448x448; default: the model's (export: "
        "'native', any grid, for the native-resolution families; HxW exports one size)",
    )
    group.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="parameter dtype (default float32 on every device; float16 / bfloat16 also run "
        "on the CPU, slowly)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed for random weights and inputs")


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """``--device``: where the PyTorch model runs (with ``add_model_args``' ``--dtype``)."""
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="where the PyTorch model runs: cpu (default), cuda, or auto (cuda when torch sees "
        "a CUDA GPU, else cpu)",
    )


def add_ipcv_args(parser: argparse.ArgumentParser) -> None:
    """IPCV settings; each one left out takes the family's reference value."""
    group = parser.add_argument_group("IPCV (defaults: the paper's settings for the family)")
    group.add_argument(
        "--prune-layer", type=int, metavar="K", help="block K where tokens are selected"
    )
    keep = group.add_mutually_exclusive_group()
    keep.add_argument("--keep-ratio", type=float, help="fraction of tokens kept, in (0, 1]")
    keep.add_argument("--reduction", type=float, help="fraction of tokens removed (1 - keep ratio)")
    group.add_argument("--as-layers", type=int, help="Attention Stabilization blocks (0 = off)")
    group.add_argument("--num-neighbors", type=int, metavar="k", help="NGR neighbours")
    group.add_argument("--selection", choices=SELECTION_MODES, help="top-k per image or global")


def ipcv_config(args: argparse.Namespace, adapter: type[FamilyAdapter]) -> IPCVConfig:
    """The family's reference config with the options given on the command line."""
    keep_ratio = args.keep_ratio
    if args.reduction is not None:
        keep_ratio = IPCVConfig.from_reduction(args.reduction).keep_ratio
    overrides: dict[str, Any] = {
        "prune_layer": args.prune_layer,
        "keep_ratio": keep_ratio,
        "as_layers": args.as_layers,
        "num_neighbors": args.num_neighbors,
        "selection": args.selection,
    }
    return dataclasses.replace(
        adapter.reference_ipcv(), **{k: v for k, v in overrides.items() if v is not None}
    )
