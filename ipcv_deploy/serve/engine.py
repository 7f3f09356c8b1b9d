"""The batching engine: a bounded queue of requests, one worker thread, the pipeline's batches.

Requests wait in a bounded queue (full: the caller answers 503). The worker takes the oldest
request and every queued one that can share its batch (the same sampling settings: greedy
requests always batch together; one image each, resized to the encoder's size, so the image
token counts match as the pipeline requires), up to ``max_batch``, and runs them through
``VLMPipeline.run``. Tokens are streamed to each request as they come; a request's own
``max_tokens``, its stop strings, and a client that went away stop that request alone (the
pipeline's per-sample stop), and its slot is free at the end of the batch.
"""

from __future__ import annotations

import asyncio
import collections
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ipcv_deploy.errors import IpcvError
from ipcv_deploy.runtime import SamplingConfig, VLMPipeline
from ipcv_deploy.serve.protocol import ApiError, ChatRequest

__all__ = ["BatchEngine", "Event", "Job", "QueueFullError"]


class QueueFullError(Exception):
    """The queue holds ``max_queue`` requests already."""


@dataclass(frozen=True)
class Event:
    """What a request hears from the worker.

    ``started`` (its first token exists), ``delta`` (new text), ``done`` or ``error``.
    """

    kind: str
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: ApiError | None = None


@dataclass
class Job:
    """One request in the engine."""

    request: ChatRequest
    prompt: str
    image: Image.Image
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: str = ""
    finish_reason: str | None = None

    @property
    def group(self) -> tuple[Any, ...]:
        """Requests of one group may share a batch (the pipeline samples a batch one way)."""
        r = self.request
        return ("greedy",) if r.temperature == 0 else (r.temperature, r.top_p, r.seed)

    def put(self, event: Event) -> None:
        """Hand ``event`` to the request's coroutine (from the worker thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still start a stop string (not sent yet)."""
    return max(
        (n for stop in stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0
    )


class BatchEngine:
    """Runs queued chat requests through one ``VLMPipeline`` in batches.

    Args:
        pipeline: the loaded pipeline (vision backend + LLM, IPCV and LLM pruning set).
        max_batch: requests per pipeline batch.
        max_queue: requests waiting at most; more are refused (``QueueFullError``).
        batch_window_s: how long the worker waits for company before a batch starts.
    """

    def __init__(
        self,
        pipeline: VLMPipeline,
        max_batch: int = 8,
        max_queue: int = 64,
        batch_window_s: float = 0.01,
    ) -> None:
        self.pipeline = pipeline
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_window_s = batch_window_s
        self.context = int(pipeline.model.config.get_text_config().max_position_embeddings)
        generation = getattr(pipeline.model, "generation_config", None)
        eos = getattr(generation, "eos_token_id", None)
        self.eos = set([eos] if isinstance(eos, int) else (eos or []))
        self._pending: collections.deque[Job] = collections.deque()
        self._ready = threading.Condition()
        self._closing = False
        self.busy = 0
        self._worker = threading.Thread(target=self._serve, name="ipcv-batcher", daemon=True)
        self._worker.start()

    # --- the request side (event loop thread) ------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job``.

        Raises:
            QueueFullError: ``max_queue`` requests are waiting, or the engine is closing.
        """
        with self._ready:
            if self._closing or len(self._pending) >= self.max_queue:
                raise QueueFullError
            self._pending.append(job)
            self._ready.notify()

    @property
    def queued(self) -> int:
        """Requests waiting for a batch."""
        return len(self._pending)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued and running ones, stop the worker."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._worker.join(timeout)

    # --- the worker -------------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._pending and not self._closing:
                    self._ready.wait()
                if not self._pending:
                    return
            time.sleep(self.batch_window_s)  # let concurrent requests join the batch
            batch = self._take_batch()
            self.busy = len(batch)
            try:
                self._run(batch)
            finally:
                self.busy = 0

    def _take_batch(self) -> list[Job]:
        with self._ready:
            first = self._pending.popleft()
            batch = [first]
            for job in list(self._pending):
                if len(batch) == self.max_batch:
                    break
                if job.group == first.group:
                    self._pending.remove(job)
                    batch.append(job)
        return [job for job in batch if not job.cancelled]

    def _admit(self, job: Job) -> bool:
        """Check the prompt fits the context window; tell the client if it does not."""
        try:
            prompt_tokens = self.pipeline.prompt_length(job.image, job.prompt)
        except IpcvError as err:
            job.put(Event("error", error=ApiError(400, str(err), "messages")))
            return False
        if prompt_tokens + job.request.max_tokens > self.context:
            job.put(
                Event(
                    "error",
                    error=ApiError(
                        400,
                        f"the prompt is {prompt_tokens} tokens (its image included) and "
                        f"max_tokens {job.request.max_tokens}: more than the model's context "
                        f"of {self.context} tokens; shorten the messages or lower max_tokens",
                        "messages",
                        "context_length_exceeded",
                    ),
                )
            )
            return False
        return True

    def _run(self, batch: list[Job]) -> None:
        batch = [job for job in batch if self._admit(job)]
        if not batch:
            return
        first = batch[0].request
        sampling = SamplingConfig(
            max_new_tokens=max(job.request.max_tokens for job in batch),
            temperature=first.temperature,
            top_p=first.top_p,
            seed=first.seed if first.seed is not None else random.randrange(2**31),
        )

        def on_token(step: int, tokens: torch.Tensor) -> list[bool]:
            return [self._advance(job, int(tokens[b])) for b, job in enumerate(batch)]

        try:
            result = self.pipeline.run(
                [job.image for job in batch],
                [job.prompt for job in batch],
                sampling,
                on_token=on_token,
                raw_prompt=True,
            )
        except IpcvError as err:
            for job in batch:
                job.put(Event("error", error=ApiError(400, str(err))))
            return
        except Exception as err:  # a bug: the clients get a 500, the server keeps serving
            failure = ApiError(500, f"server error: {err}", kind="server_error")
            for job in batch:
                job.put(Event("error", error=failure))
            return
        stats = result.stats
        for b, job in enumerate(batch):
            if job.cancelled:
                continue
            self._flush(job, final=True)
            prompt = int(stats["prompt_tokens_per_sample"][b])
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": len(job.ids),
                "total_tokens": prompt + len(job.ids),
                "ipcv": {
                    "visual_tokens": stats["visual_tokens"],
                    "kv_cache_bytes_after_prefill": stats["kv"]["bytes_after_prefill"]
                    // len(batch),
                    "dense_kv_cache_bytes_after_prefill": stats["kv"]["dense_bytes_after_prefill"]
                    // len(batch),
                    "batch": len(batch),
                    "ttft_s": stats["ttft_s"],
                    "queued_s": (job.started or job.submitted) - job.submitted,
                },
            }
            job.put(Event("done", finish_reason=job.finish_reason or "length", usage=usage))

    def _advance(self, job: Job, token: int) -> bool:
        """Take one new token of ``job``; True when the job is finished."""
        if job.finish_reason is not None or job.cancelled:
            return True
        if job.started is None:
            job.started = time.perf_counter()
            job.put(Event("started"))
        if token in self.eos:
            job.finish_reason = "stop"
            return True
        job.ids.append(token)
        job.text = self.pipeline.decode(torch.tensor(job.ids))
        stops = job.request.stop
        hits = [i for i in (job.text.find(s) for s in stops) if i >= 0]
        if hits:
            job.text = job.text[: min(hits)]
            job.finish_reason = "stop"
        elif len(job.ids) >= job.request.max_tokens:
            job.finish_reason = "length"
        self._flush(job, final=job.finish_reason is not None)
        return job.finish_reason is not None

    def _flush(self, job: Job, final: bool) -> None:
        """Send the text not sent yet.

        Held back: what may still become a stop string, and a character whose UTF-8 bytes
        have not all arrived (decoded as U+FFFD until they do).
        """
        end = len(job.text) if final else len(job.text) - _held_back(job.text, job.request.stop)
        ready = job.text[:end]
        if not final:
            ready = ready.rstrip("\ufffd")
        if len(ready) > len(job.sent) and ready.startswith(job.sent):
            job.put(Event("delta", text=ready[len(job.sent) :]))
            job.sent = ready
