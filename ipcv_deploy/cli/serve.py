"""Serve the model over an OpenAI-compatible HTTP API (chat completions, streaming).

Any OpenAI client works: POST /v1/chat/completions with text and image_url parts (base64
data: URLs; http(s) URLs only with --allow-url-fetch), max_tokens, temperature, top_p, stop,
seed, stream; GET /v1/models; GET /health. Requests are queued (bounded: 503 with
Retry-After when full) and batched through the same pipeline as `run`. Binds to 127.0.0.1
unless --host says otherwise; --api-key makes every route but /health require it.
"""

from __future__ import annotations

import argparse
import os

from ipcv_deploy.bench.report import progress
from ipcv_deploy.cli.options import add_ipcv_args, add_model_args, require_at_least
from ipcv_deploy.cli.run import add_pipeline_args, build_pipeline, describe
from ipcv_deploy.errors import BackendUnavailableError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``serve``."""
    add_model_args(parser)
    add_ipcv_args(parser)
    add_pipeline_args(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument(
        "--api-key",
        default=os.environ.get("IPCV_API_KEY"),
        help="require Authorization: Bearer KEY (default: $IPCV_API_KEY, none if unset)",
    )
    group.add_argument("--served-model-name", help="the model id clients send (default --model)")
    group.add_argument("--max-batch", type=int, default=8, help="requests per batch (default 8)")
    group.add_argument("--max-queue", type=int, default=64, help="waiting requests (default 64)")
    group.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens accepted")
    group.add_argument(
        "--default-max-tokens", type=int, default=256, help="max_tokens when a request has none"
    )
    group.add_argument("--max-body-mb", type=float, default=20.0, help="request body limit")
    group.add_argument("--max-image-mb", type=float, default=10.0, help="encoded image limit")
    group.add_argument(
        "--max-image-pixels", type=int, default=4096 * 4096, help="width x height limit"
    )
    group.add_argument(
        "--allow-url-fetch",
        action="store_true",
        help="fetch http(s) image URLs (off: only data: URLs are accepted)",
    )
    group.add_argument("--fetch-timeout", type=float, default=10.0, help="seconds per fetch")


def run(args: argparse.Namespace) -> int:
    """Load the pipeline, then serve until SIGINT / SIGTERM (in-flight requests finish)."""
    for option in ("max_batch", "max_queue", "max_tokens", "default_max_tokens"):
        require_at_least(f"--{option.replace('_', '-')}", getattr(args, option), 1)
    require_at_least("--port", args.port, 0)
    try:
        import uvicorn

        from ipcv_deploy.serve.app import create_app
        from ipcv_deploy.serve.engine import BatchEngine
        from ipcv_deploy.serve.protocol import ServerLimits
    except ImportError as err:
        raise BackendUnavailableError(
            f"serving needs fastapi and uvicorn ({err.name} is missing); pip install -e ."
        ) from None
    limits = ServerLimits(
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_image_bytes=int(args.max_image_mb * 2**20),
        max_image_pixels=args.max_image_pixels,
        max_tokens=args.max_tokens,
        default_max_tokens=min(args.default_max_tokens, args.max_tokens),
        allow_url_fetch=args.allow_url_fetch,
        fetch_timeout_s=args.fetch_timeout,
    )
    pipeline = build_pipeline(args)
    engine = BatchEngine(pipeline, max_batch=args.max_batch, max_queue=args.max_queue)
    model_id = args.served_model_name or args.model
    app = create_app(engine, model_id, limits, api_key=args.api_key)
    progress(f"{describe(pipeline)}")
    progress(f"serving {model_id!r} on http://{args.host}:{args.port}/v1 (Ctrl-C stops)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0
