"""The vLLM LLM backend: our encoder runs here, a vLLM OpenAI server runs the LLM.

``VllmClient`` processes the image with the model's own processor, runs the vision backend
(torch IPCV, or an ``ort`` / ``trt`` artifact) and sends the LLM embeddings it produces to a
vLLM server as ``image_embeds`` content parts, with each image's ``image_grid_thw``. Started
with ``--enable-mm-embeds --limit-mm-per-prompt '{"image": 0}'``, vLLM loads no vision tower
and computes the mRoPE positions from the grid. The answer streams back over HTTP.

LLM-side pruning is the transformers backend's alone; vLLM decodes every restored token.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from ipcv_deploy.errors import BackendUnavailableError, ConfigError, InputError
from ipcv_deploy.runtime.answers import Answer, SamplingConfig, TextCallback
from ipcv_deploy.runtime.images import PromptImages
from ipcv_deploy.runtime.pipeline import VLMPipeline

__all__ = ["SERVER_COMMAND", "VllmClient", "serialize_tensor"]

#: How the server this client talks to is started (shown when none answers).
SERVER_COMMAND = (
    "python -m vllm.entrypoints.openai.api_server --model CHECKPOINT --enable-mm-embeds "
    '--limit-mm-per-prompt \'{"image": 0, "video": 0}\''
)


def serialize_tensor(tensor: torch.Tensor) -> str:
    """Base64 of the ``.npy`` bytes of ``tensor`` (vLLM reads ``.npy`` or ``torch.save``)."""
    buffer = io.BytesIO()
    np.save(buffer, tensor.detach().float().cpu().numpy(), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class VllmClient:
    """A vision front-end (processor + vision backend) feeding a vLLM OpenAI server.

    ``answer`` is the ``LLMBackend`` interface; ``stats`` add ``vision_s`` and ``server``.

    Args:
        front: the pipeline whose processor and vision backend make the embeddings (its LLM
            is not run).
        url: the server's base URL, e.g. ``http://127.0.0.1:8000`` (``/v1`` optional).
        model: the served model id to request (default: the server's only model).
        timeout: seconds to wait for the server to answer a request.

    Raises:
        BackendUnavailableError: no server answers at ``url``.
        ConfigError: the server serves another model, or several and ``model`` is not given.
    """

    name = "vllm"

    def __init__(
        self, front: VLMPipeline, url: str, model: str | None = None, timeout: float = 600.0
    ) -> None:
        if front.llm_pruning is not None:
            raise ConfigError(
                "--llm-pruning runs on --llm-backend transformers only; vLLM decodes every "
                "restored token: drop --llm-pruning"
            )
        if not front.vision.native:
            raise ConfigError(
                f"--llm-backend vllm sends image_embeds with image_grid_thw, which only the "
                f"native-resolution families take; {front.loaded.name} is not one of them: use "
                "--llm-backend transformers"
            )
        self.front = front
        #: The LLM's embedding width, which every image embedding must have.
        self.width = int(front.model.get_input_embeddings().embedding_dim)
        self.url = url.rstrip("/").removesuffix("/v1")
        self.http = httpx.Client(base_url=self.url, timeout=timeout)
        self.model = self._served_model(model)
        self._check_tokenizer()

    # --- server checks ---------------------------------------------------------------------
    def _get(self, path: str) -> Any:
        try:
            response = self.http.get(path, timeout=10.0)
        except httpx.HTTPError as err:
            raise BackendUnavailableError(
                f"no vLLM server answers at {self.url} ({type(err).__name__}: {err}); start one "
                f"with `{SERVER_COMMAND}` or pass its --vllm-url"
            ) from None
        if response.status_code != 200:
            raise BackendUnavailableError(
                f"{self.url}{path} answered HTTP {response.status_code}; is it a vLLM OpenAI "
                "server? pass its base URL as --vllm-url"
            )
        return response.json()

    def _served_model(self, wanted: str | None) -> str:
        cards = self._get("/v1/models").get("data", [])
        ids = [card["id"] for card in cards]
        if wanted is None and len(ids) == 1:
            wanted = ids[0]
        if wanted not in ids:
            raise ConfigError(
                f"the vLLM server at {self.url} serves {', '.join(map(repr, ids)) or 'no model'}"
                + (f", not {wanted!r}" if wanted else "")
                + ": pass --vllm-model with one of them"
            )
        card = next(c for c in cards if c["id"] == wanted)
        self._check_width(card)
        return wanted

    def _check_width(self, card: dict[str, Any]) -> None:
        """Where the served checkpoint is on this machine, its LLM width must be ours."""
        config = Path(str(card.get("root"))) / "config.json"
        if not config.is_file():
            return
        data = json.loads(config.read_text())
        theirs = data.get("text_config", data).get("hidden_size")
        ours = self.width
        if theirs is not None and theirs != ours:
            raise ConfigError(
                f"the vLLM server at {self.url} serves {card['root']}, whose LLM is {theirs} "
                f"wide; {self.front.loaded.name}'s embeddings are {ours}: start the server "
                "with the same checkpoint"
            )

    def _check_tokenizer(self) -> None:
        """The server's tokenizer must be the model's: refuse a server of another model."""
        probe = self.front.format_prompt("IPCV probe: 0123 ab")
        ours = self.front.processor.tokenizer(probe, add_special_tokens=False)["input_ids"]
        body = {"model": self.model, "prompt": probe, "add_special_tokens": False}
        try:
            response = self.http.post("/tokenize", json=body)
        except httpx.HTTPError as err:
            raise BackendUnavailableError(
                f"the server at {self.url} did not answer /tokenize ({type(err).__name__})"
            ) from None
        if response.status_code != 200:
            raise BackendUnavailableError(
                f"{self.url} answered /tokenize with HTTP {response.status_code}: not a vLLM "
                f"OpenAI server; start one with `{SERVER_COMMAND}`"
            )
        theirs = response.json().get("tokens")
        if theirs != list(ours):
            raise ConfigError(
                f"the vLLM server at {self.url} serves {self.model!r}, whose tokenizer is not "
                f"{self.front.loaded.name}'s: start the server with the same checkpoint"
            )

    # --- requests ------------------------------------------------------------------------------
    def messages(
        self, embeds: Sequence[torch.Tensor], grids: Sequence[Sequence[int]], prompt: str
    ) -> list[dict]:
        """The chat message of the images (their embeddings and grids, in order) and the question.

        Raises:
            InputError: embeddings that do not fit their grid or the LLM (vLLM 0.32 would take
                them and crash its engine, so they are refused here).
        """
        if len(embeds) != len(grids) or not embeds:
            raise InputError(
                f"{len(embeds)} image embeddings for {len(grids)} grids: pass one grid per image"
            )
        merge = self.front.loaded.vision.spatial_merge_size**2
        width = self.width
        parts = []
        for image, grid in zip(embeds, grids, strict=True):
            grid = [int(g) for g in grid]
            rows = grid[0] * grid[1] * grid[2] // merge if len(grid) == 3 else None
            if rows is None or image.ndim != 2 or tuple(image.shape) != (rows, width):
                raise InputError(
                    f"image embeddings {tuple(image.shape)} do not fit image_grid_thw {grid} "
                    f"and the LLM's width {width} (expected [{rows}, {width}]); pass the vision "
                    "backend's output with its own grid"
                )
            data = {"image_embeds": serialize_tensor(image), "image_grid_thw": grid}
            parts.append({"type": "image_embeds", "image_embeds": data})
        return [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]

    def answer(
        self,
        image: PromptImages,
        prompt: str,
        sampling: SamplingConfig | None = None,
        on_text: TextCallback | None = None,
    ) -> Answer:
        """Encode the prompt's image (or images) here, answer on the server (streamed)."""
        start = time.perf_counter()
        encoded = self.front.encode([image], [prompt])
        grids = encoded.batch["image_grid_thw"].tolist()
        embeds = list(encoded.embeds.split(encoded.tokens_per_image))
        answer = self.complete(embeds, grids, prompt, sampling, on_text)
        stats = answer.stats
        stats.update(encoded.timings)
        stats["ttft_s"] += time.perf_counter() - start - stats["request_s"]
        visual = self.front.visual_tokens(encoded)
        stats["visual_tokens"] = {**visual, "llm_kept": visual["llm_input"]}
        stats.update(vision_backend=self.front.vision.name, ipcv=self.front.vision.ipcv)
        return answer

    def complete(
        self,
        embeds: Sequence[torch.Tensor],
        grids: Sequence[Sequence[int]],
        prompt: str,
        sampling: SamplingConfig | None = None,
        on_text: TextCallback | None = None,
    ) -> Answer:
        """Answer ``prompt`` about images given as their LLM embeddings and grids.

        Args:
            embeds: per image, [t*h*w / merge**2, hidden] embeddings (any vision backend's).
            grids: per image, its ``image_grid_thw`` row (t, h, w).
            prompt: the question; the server's chat template places the images before it.
            sampling: decoding settings (default greedy, 32 tokens).
            on_text: called with each streamed piece of the answer.

        Raises:
            InputError: embeddings that do not fit, or the server refused the request (its
                message, one line).
        """
        sampling = sampling or SamplingConfig()
        body = {
            "model": self.model,
            "messages": self.messages(embeds, grids, prompt),
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": sampling.seed,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
        if not sampling.stop_at_eos:
            body.update(ignore_eos=True, min_tokens=sampling.max_new_tokens)
        start = time.perf_counter()
        text, tokens, usage, first = [], [], {}, None
        for chunk in self._stream(body):
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {}).get("content") or ""
                tokens += choice.get("token_ids") or []
                if delta or choice.get("token_ids"):
                    first = first or time.perf_counter()
                if delta:
                    text.append(delta)
                    if on_text is not None:
                        on_text(delta)
        end = time.perf_counter()
        first = first or end
        new_tokens = int(usage.get("completion_tokens", len(tokens)))
        decode = end - first
        stats = {
            "request_s": end - start,
            "ttft_s": first - start,
            "decode_s": decode,
            "new_tokens": new_tokens,
            "decode_tokens_per_s": (new_tokens - 1) / decode if decode else None,
            "prompt_tokens": usage.get("prompt_tokens"),
            "llm_backend": self.name,
            "llm_pruning": None,
            "server": {"url": self.url, "model": self.model},
        }
        return Answer("".join(text), tokens, stats)

    def _stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The server's streamed chunks (server-sent events) of one chat completion."""
        try:
            with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise InputError(_server_error(response.status_code, response.read().decode()))
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise InputError(_server_error(chunk["error"].get("code", 500), data))
                    yield chunk
        except httpx.HTTPError as err:
            raise BackendUnavailableError(
                f"the vLLM server at {self.url} stopped answering ({type(err).__name__}: {err})"
            ) from None

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self.http.close()


def _server_error(status: int | str, text: str) -> str:
    """One line out of an OpenAI-style error body (vLLM's ``{"error": {"message"}}``)."""
    try:
        payload = json.loads(text)
        message = payload.get("error", payload)
        message = message.get("message", message) if isinstance(message, dict) else message
    except (json.JSONDecodeError, AttributeError):
        message = text
    first = str(message).strip().splitlines()[0] if str(message).strip() else "no message"
    return f"the vLLM server refused the request (HTTP {status}): {first[:300]}"
