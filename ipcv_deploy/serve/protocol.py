"""The OpenAI chat-completions wire format: request validation, errors, response bodies.

Requests are validated by hand so every problem is one OpenAI-style JSON error naming the
field (``{"error": {"message", "type", "param", "code"}}``) with a 4xx status. OpenAI fields
the server does not implement are ignored and listed in a ``Warning`` header, as vLLM does,
so stock clients that send them keep working.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ApiError",
    "ChatRequest",
    "ImagePart",
    "ServerLimits",
    "chat_chunk",
    "chat_completion",
    "completion_id",
    "parse_chat_request",
]

#: Request fields the server reads.
_SUPPORTED = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "n",
    "user",
}
_ROLES = {"system", "developer", "user", "assistant"}
_MAX_STOPS = 4


class ApiError(Exception):
    """An error the client caused (or a refusal), sent as OpenAI's JSON error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """``{"error": {...}}`` as OpenAI sends it."""
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for.

    Attributes:
        max_body_bytes: request body size.
        max_image_bytes: one image's encoded size (``data:`` URL or fetched).
        max_image_pixels: one image's width x height.
        max_images: images per request (the pipeline answers about one image per prompt).
        max_tokens: the largest ``max_tokens`` accepted; ``default_max_tokens`` when absent.
        allow_url_fetch: fetch ``http(s)://`` image URLs (never ``file://`` or others).
        fetch_timeout_s: timeout of one fetch.
    """

    max_body_bytes: int = 20 << 20
    max_image_bytes: int = 10 << 20
    max_image_pixels: int = 4096 * 4096
    max_images: int = 1
    max_tokens: int = 1024
    default_max_tokens: int = 256
    allow_url_fetch: bool = False
    fetch_timeout_s: float = 10.0


@dataclass(frozen=True)
class ImagePart:
    """An ``image_url`` content part: where the image is (a ``data:`` or web URL)."""

    url: str
    param: str


@dataclass
class ChatRequest:
    """A validated chat-completions request.

    ``messages`` are in the processor's chat-template form (image parts as
    ``{"type": "image"}``), ``images`` the image parts in order.
    """

    model: str
    messages: list[dict[str, Any]]
    images: list[ImagePart]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    ignored: list[str] = field(default_factory=list)


def _type_error(param: str, want: str, value: Any) -> ApiError:
    return ApiError(
        400, f"'{param}' must be {want}, got {type(value).__name__} {value!r}"[:300], param
    )


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _type_error(name, "a number", value)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be in [{low:g}, {high:g}], got {value:g}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, "an integer", value)
    return value


def _content(message: dict[str, Any], index: int, images: list[ImagePart]) -> Any:
    """A message's content in chat-template form; image parts collected in ``images``."""
    param = f"messages[{index}].content"
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None and message.get("role") == "assistant":
        return ""
    if not isinstance(content, list) or not content:
        raise _type_error(param, "a string or a non-empty list of content parts", content)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise _type_error(where, "an object", part)
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _type_error(f"{where}.text", "a string", part.get("text"))
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise _type_error(f"{where}.image_url.url", "a URL string", url)
            images.append(ImagePart(url, f"{where}.image_url.url"))
            parts.append({"type": "image"})
        else:
            raise ApiError(
                400,
                f"content part type {kind!r} is not supported; use 'text' or 'image_url'",
                f"{where}.type",
            )
    return parts


def parse_chat_request(body: Any, model_id: str, limits: ServerLimits) -> ChatRequest:
    """Validate a decoded JSON body against the chat-completions format and our limits.

    Raises:
        ApiError: 400 naming the field, or 404 for another model's name.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise _type_error("model", "a string", model)
    if model != model_id:
        raise ApiError(
            404, f"The model `{model}` does not exist; this server serves `{model_id}`",
            "model", "model_not_found",
        )  # fmt: skip
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _type_error("messages", "a non-empty list of messages", messages)
    images: list[ImagePart] = []
    converted = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _type_error(f"messages[{i}]", "an object", message)
        role = message.get("role")
        if role not in _ROLES:
            raise ApiError(
                400,
                f"messages[{i}].role {role!r} is not supported; use system, user or assistant",
                f"messages[{i}].role",
            )
        role = "system" if role == "developer" else role
        converted.append({"role": role, "content": _content(message, i, images)})
    if len(images) != limits.max_images:
        raise ApiError(
            400,
            f"this server answers about {limits.max_images} image per request, the messages "
            f"hold {len(images)}; attach exactly {limits.max_images} image_url part",
            "messages",
        )
    n = _integer(body, "n")
    if n not in (None, 1):
        raise ApiError(400, f"'n' must be 1 (one choice per request), got {n}", "n")
    max_tokens = _integer(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens")
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    if not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(
            400,
            f"'max_tokens' must be in [1, {limits.max_tokens}], got {max_tokens}",
            "max_tokens",
        )
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None:
        stops = []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _type_error("stop", "a string or a list of non-empty strings", stop)
    if len(stops) > _MAX_STOPS:
        raise ApiError(400, f"'stop' takes at most {_MAX_STOPS} sequences", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _type_error("stream", "a boolean", stream)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _type_error("stream_options", "an object", options)
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _type_error("stream_options.include_usage", "a boolean", include_usage)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "'top_p' must be in (0, 1], got 0", "top_p")
    return ChatRequest(
        model=model,
        messages=converted,
        images=images,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=top_p,
        seed=_integer(body, "seed"),
        stop=stops,
        stream=stream,
        include_usage=include_usage,
        ignored=sorted(set(body) - _SUPPORTED),
    )


def completion_id() -> str:
    """A fresh ``chatcmpl-...`` id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def chat_completion(
    cid: str, model: str, text: str, finish_reason: str, usage: dict[str, Any]
) -> dict[str, Any]:
    """The non-streamed response body."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage,
    }


def chat_chunk(
    cid: str,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One server-sent chunk (``delta`` ``None``: the usage-only chunk with no choices)."""
    chunk: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk
