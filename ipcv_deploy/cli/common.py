"""Options and helpers that import nothing heavy.

Shared by every verb, and by the torch-free ``run --llm-backend ort-genai``
(``cli/run_genai.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ipcv_deploy.errors import InputError

__all__ = [
    "LLM_BACKENDS",
    "add_decoding_args",
    "add_llm_backend_arg",
    "add_output_args",
    "add_prompt_args",
    "add_vllm_args",
    "print_json",
    "require_at_least",
    "stream_text",
]

#: ``--llm-backend`` values: the transformers model in PyTorch (the reference, with LLM-side
#: pruning), an ONNX Runtime GenAI package (``export --format ort-genai``, no torch), or a
#: vLLM OpenAI server fed our encoder's embeddings (``--vllm-url``).
LLM_BACKENDS = ("transformers", "ort-genai", "vllm")


def require_at_least(option: str, value: float | None, minimum: float) -> None:
    """Raise ``InputError`` naming ``option`` unless ``value`` is ``None`` or >= ``minimum``."""
    if value is not None and not value >= minimum:  # also refuses NaN
        raise InputError(f"{option} must be at least {minimum:g}, got {value:g}")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """``--json``: exactly one JSON document on stdout instead of the table."""
    parser.add_argument("--json", action="store_true", help="print one JSON document for scripts")


def print_json(data: Any) -> None:
    """The one JSON document of ``--json``."""
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def stream_text(text: str) -> None:
    """Print a piece of a streamed answer at once."""
    sys.stdout.write(text)
    sys.stdout.flush()


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    """``--image``, ``--prompt``, ``--raw-prompt``, ``--no-stream`` of ``run``."""
    parser.add_argument(
        "--image",
        type=Path,
        action="append",
        help="image file (default: a built-in test card); repeat it for several images in "
        "one prompt, in order",
    )
    parser.add_argument("--prompt", default="Describe the image.", help="the question")
    parser.add_argument(
        "--raw-prompt",
        action="store_true",
        help="use --prompt as is (it must hold the image placeholder) instead of the chat template",
    )
    parser.add_argument("--no-stream", action="store_true", help="print the answer at the end")


def add_decoding_args(parser: argparse.ArgumentParser) -> None:
    """``--max-new-tokens``, ``--temperature``, ``--top-p``."""
    group = parser.add_argument_group("decoding")
    group.add_argument("--max-new-tokens", type=int, default=32)
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    group.add_argument("--top-p", type=float, default=1.0)


def add_llm_backend_arg(parser: argparse.ArgumentParser) -> None:
    """``--llm-backend``."""
    parser.add_argument(
        "--llm-backend",
        choices=LLM_BACKENDS,
        default="transformers",
        help="transformers: the model in PyTorch (default; the only one with --llm-pruning); "
        "ort-genai: an ONNX Runtime GenAI package (--artifact DIR from `export --format "
        "ort-genai`), run without torch; vllm: a vLLM server (--vllm-url) decodes, the vision "
        "encoder runs here",
    )


def add_vllm_args(parser: argparse.ArgumentParser) -> None:
    """``--vllm-url``, ``--vllm-model`` of ``--llm-backend vllm``."""
    group = parser.add_argument_group("vLLM (--llm-backend vllm)")
    group.add_argument(
        "--vllm-url",
        help="base URL of a vLLM OpenAI server started with --enable-mm-embeds, e.g. "
        "http://127.0.0.1:8000",
    )
    group.add_argument("--vllm-model", help="served model id (default: the server's only one)")
