"""VQA-style accuracy, dense vs compressed, over a local .jsonl of (image, question, answer).

The dense model (torch vision, no IPCV, no LLM pruning) is the reference; the compressed
variant is what the runtime options describe (IPCV by default, plus --llm-pruning if given).
--llm-backend picks the LLM: transformers (default); vllm (--vllm-url: both variants'
embeddings go to the server); ort-genai (--artifact PKG is the compressed variant, the
reference is the dense transformers model of --model). Prints exact-match and contains
accuracy, agreement with dense and time to first token per variant; --out writes the report
with every prediction.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ipcv_deploy.bench.report import format_table, progress
from ipcv_deploy.cli.common import add_llm_backend_arg, add_vllm_args
from ipcv_deploy.cli.options import (
    add_ipcv_args,
    add_model_args,
    add_output_args,
    print_json,
    require_at_least,
)
from ipcv_deploy.cli.run import add_runtime_args, llm_backend, sampling
from ipcv_deploy.errors import ConfigError
from ipcv_deploy.fileio import write_json
from ipcv_deploy.runtime import VLMPipeline
from ipcv_deploy.runtime.answers import LLMBackend
from ipcv_deploy.runtime.evaluate import evaluate, load_items
from ipcv_deploy.runtime.vllm_client import VllmClient


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``eval``."""
    parser.add_argument("data", type=Path, help=".jsonl file (or a folder holding one)")
    add_model_args(parser)
    add_ipcv_args(parser)
    add_llm_backend_arg(parser)
    add_vllm_args(parser)
    add_runtime_args(parser)
    parser.add_argument("--batch", type=int, default=1, help="prompts per batch (default 1)")
    parser.add_argument("--limit", type=int, help="only the first N items")
    parser.add_argument("--out", type=Path, help="write the full report (JSON) here")
    add_output_args(parser)


def _variants(args: argparse.Namespace) -> dict[str, LLMBackend]:
    """The dense reference and the compressed variant, on the LLM backend the options pick."""
    if args.llm_backend == "ort-genai":
        if args.artifact is None or args.vision_backend != "torch" or args.llm_pruning != "none":
            raise ConfigError(
                "--llm-backend ort-genai evaluates a package: pass --artifact DIR (`export "
                "--format ort-genai`) and no --vision-backend / --llm-pruning"
            )
        from ipcv_deploy.runtime.ort_genai import GenaiPipeline

        compressed = GenaiPipeline(args.artifact, expect_model=args.model)
        progress(f"loading {args.model} ...")
        dense = VLMPipeline.create(args.model, dtype=args.dtype, seed=args.seed)
        return {"dense (transformers)": dense, "compressed (ort-genai)": compressed}
    compressed = llm_backend(args)
    front = compressed.front if isinstance(compressed, VllmClient) else compressed
    # the same preprocessing: native grids, the model's tiles, or the one fixed size
    size = None if front.vision.native or front.vision.tiles else front.vision.image_size
    dense = VLMPipeline.create(front.loaded, image_size=size)
    if isinstance(compressed, VllmClient):
        return {
            "dense": VllmClient(dense, compressed.url, compressed.model),
            "compressed": compressed,
        }
    return {"dense": dense, "compressed": compressed}


def run(args: argparse.Namespace) -> int:
    """Load the items, run dense and compressed, report."""
    require_at_least("--batch", args.batch, 1)
    require_at_least("--limit", args.limit, 1)
    items = load_items(args.data, args.limit)
    backends = _variants(args)
    report = evaluate(backends, items, sampling(args), args.batch, progress)
    report["model"] = args.model
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
