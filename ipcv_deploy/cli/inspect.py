"""Show what an artifact holds: model, image grid, IPCV settings, graph I/O, ipcv nodes, files.

Checks every file against the manifest's hash on the way. --trt-check also runs the static
TensorRT check on the TensorRT flavour (no TensorRT needed): exit 1 when it finds errors.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from ipcv_deploy.artifact import Artifact, load_artifact
from ipcv_deploy.cli.options import add_output_args, print_json
from ipcv_deploy.ops import DOMAIN


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``inspect``."""
    parser.add_argument("artifact", type=Path, help="directory written by `ipcv-export export`")
    parser.add_argument(
        "--trt-check", action="store_true", help="will TensorRT's ONNX parser accept the graph?"
    )
    parser.add_argument(
        "--precision", default="fp16", choices=["fp32", "fp16", "bf16"], help="for --trt-check"
    )
    add_output_args(parser)


def ipcv_nodes(artifact: Artifact) -> dict[str, dict[str, int]]:
    """Per flavour, how many nodes of each ``ipcv`` op the graph holds."""
    import onnx

    counts = {}
    for flavour in artifact.manifest.flavours:
        model = onnx.load(str(artifact.flavour_file(flavour)), load_external_data=False)
        counts[flavour] = dict(Counter(n.op_type for n in model.graph.node if n.domain == DOMAIN))
    return counts


def run(args: argparse.Namespace) -> int:
    """Load (with hash checks) and print."""
    artifact = load_artifact(args.artifact, check="full")
    nodes = ipcv_nodes(artifact)
    m = artifact.manifest
    check = _trt_check(artifact, args.precision) if args.trt_check else None
    code = 0 if check is None or check.passed else 1
    if args.json:
        extra = {"trt_check": check.to_dict()} if check else {}
        print_json({"artifact": str(args.artifact), "ipcv_nodes": nodes, **m.to_dict(), **extra})
        return code
    source = ", ".join(f"{k} {v}" for k, v in m.source.items())
    print(f"{args.artifact}: {m.family} ({m.model_type}) vision encoder, {m.dtype}")
    print(f"  source: {source}")
    if m.native:
        n = m.native
        print(
            f"  native resolution: {n['min_tokens']}..{n['max_tokens']} patches per image "
            f"({n['min_pixels']}..{n['max_pixels']} px), one image per call; counts below at "
            "the example size"
        )
    print(f"  image: {m.image_size[0]}x{m.image_size[1]}, {m.tokens_per_image} tokens per image")
    if m.ipcv is None:
        print("  IPCV: none (dense export)")
    else:
        c = m.ipcv
        print(
            f"  IPCV: K={c['prune_layer']}, keep {c['keep_ratio']:.0%} -> {m.kept_per_image} "
            f"tokens, AS={c['as_layers']}, k={c['num_neighbors']}; "
            f"{m.flops_per_image['exported'] / m.flops_per_image['dense']:.1%} of dense FLOPs"
        )
    for t in m.inputs:
        print(f"  input  {t.name} {t.dtype} [{', '.join(map(str, t.shape))}]")
    for t in m.outputs:
        print(f"  output {t.name} {t.dtype} [{', '.join(map(str, t.shape))}] ({m.output_kind})")
    opsets = ", ".join(f"{domain or 'ai.onnx'} {v}" for domain, v in m.opsets.items())
    print(f"  op sets: {opsets}")
    for flavour, name in m.flavours.items():
        ops = ", ".join(f"{op} x{n}" for op, n in nodes[flavour].items()) or "none"
        print(f"  {flavour} flavour {name}: ipcv nodes {ops}")
    for name, entry in m.files.items():
        print(f"  file {name}: {entry.bytes / 2**20:.1f} MiB, sha256 {entry.sha256[:16]}... ok")
    if check is not None:
        flavour = "trt" if "trt" in m.flavours else "ort"
        verdict = "accepted" if check.passed else "REJECTED"
        print(
            f"TensorRT check ({m.flavours[flavour]}, {args.precision}): {verdict}; "
            f"{check.ipcv_nodes} ipcv plugin nodes, {check.fp32_pinned_layers} layers kept in fp32"
        )
        for f in check.findings:
            print(f"  {f.severity}: [{f.rule}] {f.node}: {f.message}")
    return code


def _trt_check(artifact: Artifact, precision: str):
    import onnx

    from ipcv_deploy.trt.check import check_model

    flavour = "trt" if "trt" in artifact.manifest.flavours else "ort"
    model = onnx.load(str(artifact.flavour_file(flavour)), load_external_data=False)
    return check_model(model, precision)
