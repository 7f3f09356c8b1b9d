"""VQA-style accuracy, dense vs compressed, over a local .jsonl of (image, question, answer).

The dense model (torch, no IPCV, no LLM pruning) is the reference; the compressed variant is
what the runtime options describe (IPCV by default, plus --llm-pruning if given). Prints
exact-match and contains accuracy, agreement with dense and time to first token per variant;
--out writes the report with every prediction.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ipcv_deploy.bench.report import format_table, progress
from ipcv_deploy.cli.options import (
    add_ipcv_args,
    add_model_args,
    add_output_args,
    print_json,
    require_at_least,
)
from ipcv_deploy.cli.run import add_runtime_args, build_pipeline, sampling
from ipcv_deploy.fileio import write_json
from ipcv_deploy.runtime import VLMPipeline
from ipcv_deploy.runtime.evaluate import evaluate, load_items


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``eval``."""
    parser.add_argument("data", type=Path, help=".jsonl file (or a folder holding one)")
    add_model_args(parser)
    add_ipcv_args(parser)
    add_runtime_args(parser)
    parser.add_argument("--batch", type=int, default=1, help="prompts per batch (default 1)")
    parser.add_argument("--limit", type=int, help="only the first N items")
    parser.add_argument("--out", type=Path, help="write the full report (JSON) here")
    add_output_args(parser)


def run(args: argparse.Namespace) -> int:
    """Load the items, run dense and compressed, report."""
    require_at_least("--batch", args.batch, 1)
    require_at_least("--limit", args.limit, 1)
    items = load_items(args.data, args.limit)
    compressed = build_pipeline(args)
    size = None if compressed.vision.native else compressed.vision.image_size
    dense = VLMPipeline.create(compressed.loaded, image_size=size)
    report = evaluate(
        {"dense": dense, "compressed": compressed}, items, sampling(args), args.batch, progress
    )
    report["model"] = compressed.loaded.name
    if args.out:
        write_json(args.out, report)
    if args.json:
        print_json(report)
        return 0
    rows = []
    for name, v in report["variants"].items():
        vt = v["visual_tokens"]
        rows.append(
            [
                name,
                f"{v['exact_match']:.1%}",
                f"{v['contains']:.1%}",
                f"{v['agreement']:.1%}",
                f"{1000 * v['mean_ttft_s']:.1f}",
                f"{vt['vit_kept']}/{vt['vit_input']}",
                f"{vt['llm_kept']}/{vt['llm_input']}",
            ]
        )
    print(f"{report['model']}: {report['items']} items")
    print(
        format_table(
            ["variant", "exact", "contains", "same as dense", "TTFT ms", "ViT kept", "LLM kept"],
            rows,
        )
    )
    return 0
