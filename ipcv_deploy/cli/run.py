"""Answer a prompt about an image: vision backend (IPCV) + LLM (optional LLM-side pruning).

Streams the answer, then reports time to first token, decode speed, the visual tokens left
after each stage (ViT input, kept inside the IPCV blocks, LLM input, after LLM pruning) and
the KV-cache size. Works offline on the built-in presets (tiny LLM and tokenizer built
locally, random weights: the text is noise) and on local checkpoints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ipcv_deploy.backends.onnxruntime_backend import ORT_PROVIDERS
from ipcv_deploy.bench.report import progress
from ipcv_deploy.cli.build import DEFAULT_PLUGIN
from ipcv_deploy.cli.common import (
    add_decoding_args,
    add_llm_backend_arg,
    add_prompt_args,
    add_vllm_args,
    stream_text,
)
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
from ipcv_deploy.compression.llm_pruning import LLM_PRUNING_METHODS, LLMPruningConfig, check_keep
from ipcv_deploy.errors import ConfigError
from ipcv_deploy.models import load_model, parse_dtype, resolve_device
from ipcv_deploy.runtime import VISION_BACKENDS, SamplingConfig, VLMPipeline
from ipcv_deploy.runtime.answers import LLMBackend
from ipcv_deploy.runtime.testcard import make_test_card
from ipcv_deploy.runtime.vllm_client import SERVER_COMMAND, VllmClient


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``run``."""
    add_model_args(parser)
    add_ipcv_args(parser)
    add_llm_backend_arg(parser)
    add_vllm_args(parser)
    add_runtime_args(parser)
    add_prompt_args(parser)
    parser.add_argument(
        "--video",
        type=Path,
        help="a video after the images: a folder of frame images (in name order) or an "
        "animated GIF / PNG / WebP (native-resolution models, PyTorch vision backend; "
        "transformers' video processor needs torchvision)",
    )
    add_output_args(parser)


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """Pipeline and decoding options (shared with ``eval``)."""
    add_pipeline_args(parser)
    add_decoding_args(parser)


def add_pipeline_args(parser: argparse.ArgumentParser) -> None:
    """Device, vision backend and LLM-side pruning options (shared with ``eval``, ``serve``)."""
    add_device_args(parser)
    group = parser.add_argument_group("runtime")
    group.add_argument("--vision-backend", choices=VISION_BACKENDS, default="torch")
    group.add_argument(
        "--ort-provider",
        choices=list(ORT_PROVIDERS),
        default="cpu",
        help="ONNX Runtime execution provider for --vision-backend ort (default cpu; cuda and "
        "tensorrt need onnxruntime-gpu)",
    )
    group.add_argument(
        "--plugin-lib",
        type=Path,
        default=DEFAULT_PLUGIN,
        help=f"ipcv TensorRT plugin library for --ort-provider tensorrt (default {DEFAULT_PLUGIN})",
    )
    group.add_argument(
        "--artifact", type=Path, help="export directory for --vision-backend ort|trt"
    )
    group.add_argument(
        "--engine", type=Path, help="TensorRT engine dir (default ARTIFACT/trt-fp16)"
    )
    group.add_argument("--dense", action="store_true", help="torch backend without IPCV")
    group.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    group.add_argument(
        "--llm-pruning",
        choices=("none", *LLM_PRUNING_METHODS),
        default="none",
        help="LLM-side pruning (default none)",
    )
    group.add_argument(
        "--llm-keep", type=float, default=0.35, help="image tokens kept by it (default 0.35)"
    )
    group.add_argument(
        "--llm-layer", type=int, help="LLM layer it prunes before (default: the method's)"
    )


def build_pipeline(args: argparse.Namespace) -> VLMPipeline:
    """The pipeline the runtime options describe."""
    require_at_least("--threads", args.threads, 1)
    pruning = None
    if args.llm_pruning != "none":
        pruning = LLMPruningConfig(args.llm_pruning, args.llm_keep, args.llm_layer)
    else:
        check_keep(args.llm_keep)
    device = resolve_device(args.device)  # before loading: a missing GPU fails at once
    progress(f"loading {args.model} ...")
    loaded = load_model(args.model, parse_dtype(args.dtype), args.seed, device=device)
    image_size = parse_image_size(args.image_size) if args.image_size else None
    ipcv = (
        None if args.dense or args.vision_backend != "torch" else ipcv_config(args, loaded.adapter)
    )
    return VLMPipeline.create(
        loaded,
        vision_backend=args.vision_backend,
        ipcv=ipcv,
        artifact=args.artifact,
        engine=args.engine,
        image_size=image_size,
        llm_pruning=pruning,
        threads=args.threads,
        ort_provider=args.ort_provider,
        plugin_lib=args.plugin_lib,
    )


def sampling(args: argparse.Namespace) -> SamplingConfig:
    """Decoding settings from the options."""
    return SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)


def format_stats(stats: dict[str, Any]) -> list[str]:
    """The report lines after the answer (the KV cache on the transformers backend only)."""
    ms = {k: 1000 * v for k, v in stats.items() if k.endswith("_s")}
    vt = stats["visual_tokens"]
    after = "after LLM pruning" if stats["llm_pruning"] else "(no LLM pruning)"
    speed = stats["decode_tokens_per_s"]
    stages = f"preprocess {ms['preprocess_s']:.1f}, vision {ms['vision_s']:.1f}"
    if "prefill_s" in ms:
        stages += f", stitch {ms['stitch_s']:.1f}, prefill {ms['prefill_s']:.1f}"
    else:
        stages += f", then the {stats['llm_backend']} server"
    lines = [
        f"time to first token  {ms['ttft_s']:.1f} ms ({stages})",
        "decode               "
        + (f"{speed:.1f} tokens/s" if speed else "-")
        + f" ({stats['new_tokens']} new tokens, {ms['decode_s']:.1f} ms after the first)",
        f"visual tokens        ViT {vt['vit_input']} -> {vt['vit_kept']} in the IPCV blocks -> "
        f"{vt['llm_input']} to the LLM -> {vt['llm_kept']} {after}",
    ]
    kv = stats.get("kv")
    if kv is not None:
        mb = 1 / 2**20
        lines.append(
            f"KV cache             {kv['bytes_after_prefill'] * mb:.2f} MiB after prefill "
            f"({kv['tokens_after_prefill']} of {kv['prompt_tokens']} prompt tokens; dense "
            f"{kv['dense_bytes_after_prefill'] * mb:.2f} MiB), {kv['bytes_at_end'] * mb:.2f} MiB "
            "at the end"
        )
    return lines


def llm_backend(args: argparse.Namespace) -> LLMBackend:
    """The LLM backend the options pick (``transformers`` or ``vllm``), its vision set up."""
    pipeline = build_pipeline(args)
    if args.llm_backend == "vllm":
        if not args.vllm_url:
            raise ConfigError(
                "--llm-backend vllm needs --vllm-url URL: the base URL of a vLLM server "
                f"started with `{SERVER_COMMAND}`"
            )
        return VllmClient(pipeline, args.vllm_url, args.vllm_model)
    if args.vllm_url or args.vllm_model:
        raise ConfigError("--vllm-url / --vllm-model are for --llm-backend vllm: drop them")
    return pipeline


def describe(backend: LLMBackend) -> str:
    """One line: model, vision backend and IPCV, the LLM backend and its LLM-side pruning."""
    front = backend.front if isinstance(backend, VllmClient) else backend
    vision = front.vision
    ipcv = vision.ipcv
    vit = (
        "dense"
        if ipcv is None
        else f"IPCV K={ipcv['prune_layer']} keep {ipcv['keep_ratio']:.0%} AS={ipcv['as_layers']}"
    )
    if isinstance(backend, VllmClient):
        llm = f"LLM on vLLM {backend.model!r} at {backend.url}"
    elif front.llm_pruning is not None:
        p = front.llm_pruning
        llm = f"{p.method} keep {p.keep:.0%} before layer {front.llm_layer}"
    else:
        llm = "no LLM pruning"
    return f"{front.loaded.name}: vision {vision.name} ({vit}), {llm}"


def run(args: argparse.Namespace) -> int:
    """Load, answer, report."""
    if args.raw_prompt and args.llm_backend == "vllm":
        raise ConfigError(
            "--raw-prompt is not for --llm-backend vllm: the server applies its chat template"
        )
    if args.video is not None and args.llm_backend != "transformers":
        raise ConfigError(f"--video runs on --llm-backend transformers, not {args.llm_backend}")
    backend = llm_backend(args)
    card = args.image is None and args.video is None
    images = [make_test_card()] if card else args.image or []
    stream = not (args.json or args.no_stream)
    if not args.json:
        print(describe(backend))
        if card:
            print("image: built-in test card (pass --image FILE for yours)")
    if stream:
        sys.stdout.write("answer: ")
    extra: dict[str, Any] = {"raw_prompt": args.raw_prompt} if args.raw_prompt else {}
    if args.video is not None:
        extra["video"] = args.video
    result = backend.answer(
        images, args.prompt, sampling(args), on_text=stream_text if stream else None, **extra
    )
    if args.json:
        print_json({"answer": result.answer, "tokens": result.tokens, **result.stats})
        return 0
    print(f"answer: {result.answer}" if not stream else "")
    for line in format_stats(result.stats):
        print(line)
    return 0
