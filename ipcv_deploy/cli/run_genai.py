"""``run --llm-backend ort-genai``: answer with an ONNX Runtime GenAI package, without torch.

``ipcv-export`` sends a ``run`` naming ``--llm-backend ort-genai`` here before it imports
anything heavy, so the process that answers loads numpy, PIL and onnxruntime_genai only:
what an edge device has. The package (``export --format ort-genai``) fixes the model, the
vision encoder and its IPCV settings; LLM-side pruning is the transformers backend's alone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ipcv_deploy.cli.common import (
    add_decoding_args,
    add_llm_backend_arg,
    add_output_args,
    add_prompt_args,
    print_json,
    require_at_least,
    stream_text,
)
from ipcv_deploy.errors import ConfigError

__all__ = ["parse", "run"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipcv-export run",
        description="Answer a prompt about an image with an ONNX Runtime GenAI package.",
    )
    add_llm_backend_arg(parser)
    parser.add_argument(
        "--artifact",
        type=Path,
        help="the package directory (`ipcv-export export --format ort-genai`)",
    )
    parser.add_argument(
        "--model", help="refuse a package made from another model (preset name or checkpoint)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    add_prompt_args(parser)
    add_decoding_args(parser)
    add_output_args(parser)
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The options of a ``run --llm-backend ort-genai`` (``argv`` without ``run``).

    Raises:
        ConfigError: an option of the transformers backend (LLM-side pruning, vision backend,
            IPCV settings, device), or no ``--artifact``.
    """
    args, unknown = _parser().parse_known_args(list(argv))
    options = [a.split("=")[0] for a in unknown if a.startswith("-")]
    if unknown:
        raise ConfigError(
            f"{' '.join(options or unknown)}: not an option of --llm-backend ort-genai (the "
            "package fixes the model, the vision encoder and IPCV; LLM-side pruning runs on "
            "--llm-backend transformers only): drop it"
        )
    if args.artifact is None:
        raise ConfigError(
            "--llm-backend ort-genai runs a package: pass --artifact DIR (written by "
            "`ipcv-export export --format ort-genai`)"
        )
    if args.image is not None and len(args.image) > 1:
        raise ConfigError(
            "--llm-backend ort-genai answers about one image per prompt: pass one --image "
            "(several run on --llm-backend transformers or vllm)"
        )
    require_at_least("--max-new-tokens", args.max_new_tokens, 1)
    require_at_least("--temperature", args.temperature, 0)
    return args


def run(args: argparse.Namespace) -> int:
    """Load the package, answer, report."""
    from ipcv_deploy.runtime.answers import SamplingConfig
    from ipcv_deploy.runtime.ort_genai import GenaiPipeline
    from ipcv_deploy.runtime.testcard import make_test_card

    print(f"loading {args.artifact} ...", file=sys.stderr, flush=True)
    pipeline = GenaiPipeline(args.artifact, expect_model=args.model)
    image = args.image[0] if args.image is not None else make_test_card()
    stream = not (args.json or args.no_stream)
    if not args.json:
        data = pipeline.package.data
        ipcv = pipeline.ipcv
        vit = "dense"
        if ipcv is not None:
            vit = (
                f"IPCV K={ipcv['prune_layer']} keep {ipcv['keep_ratio']:.0%} AS={ipcv['as_layers']}"
            )
        print(f"{data['source'].get('preset') or data['source'].get('path')}: ort-genai ({vit})")
        if args.image is None:
            print("image: built-in test card (pass --image FILE for yours)")
    if stream:
        sys.stdout.write("answer: ")
    result = pipeline.answer(
        image,
        args.prompt,
        SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed),
        on_text=stream_text if stream else None,
        raw_prompt=args.raw_prompt,
    )
    if args.json:
        print_json({"answer": result.answer, "tokens": result.tokens, **result.stats})
        return 0
    print(f"answer: {result.answer}" if not stream else "")
    for line in format_stats(result.stats):
        print(line)
    return 0


def format_stats(stats: dict[str, Any]) -> list[str]:
    """The report lines after the answer."""
    vt = stats["visual_tokens"]
    speed = stats["decode_tokens_per_s"]
    return [
        f"time to first token  {1000 * stats['ttft_s']:.1f} ms (preprocess "
        f"{1000 * stats['preprocess_s']:.1f}; vision, embedding and prefill in ONNX Runtime GenAI)",
        "decode               "
        + (f"{speed:.1f} tokens/s" if speed else "-")
        + f" ({stats['new_tokens']} new tokens, {1000 * stats['decode_s']:.1f} ms after the first)",
        f"visual tokens        ViT {vt['vit_input']} -> {vt['vit_kept']} in the IPCV blocks -> "
        f"{vt['llm_input']} to the LLM",
    ]
