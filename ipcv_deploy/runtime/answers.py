"""What every LLM backend shares: decoding settings, one answer, the backend interface.

Imports nothing heavy, so the torch-free ONNX Runtime GenAI backend uses it too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ipcv_deploy.errors import ConfigError
from ipcv_deploy.runtime.images import ImageInput

__all__ = ["Answer", "LLMBackend", "SamplingConfig", "TextCallback"]

#: Called with each new piece of the answer's text as it is generated (streaming).
TextCallback = Callable[[str], None]


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings.

    ``temperature`` 0 is greedy; ``stop_at_eos`` False always decodes ``max_new_tokens``
    (benchmarks).
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(
                f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, "
                f"{self.top_p}"
            )


@dataclass
class Answer:
    """One answer: its text, the generated token ids and the measurements.

    ``stats`` has, on every backend, seconds (``preprocess_s``, ``ttft_s``, ``decode_s``),
    ``new_tokens``, ``decode_tokens_per_s``, ``visual_tokens`` (``vit_input``, ``vit_kept``,
    ``llm_input``, ``llm_kept``), ``llm_backend``, ``ipcv`` and ``llm_pruning``; backends add
    their own. ``logits`` holds per-step logits where a backend was asked for them.
    """

    answer: str
    tokens: list[int]
    stats: dict[str, Any] = field(default_factory=dict)
    logits: list[Any] = field(default_factory=list)


class LLMBackend(Protocol):
    """An LLM backend as ``run``, ``eval`` and the benchmark use it: one image, one prompt."""

    #: ``transformers``, ``ort-genai`` or ``vllm``.
    name: str

    def answer(
        self,
        image: ImageInput,
        prompt: str,
        sampling: SamplingConfig | None = None,
        on_text: TextCallback | None = None,
    ) -> Answer:
        """Answer ``prompt`` about ``image``, calling ``on_text`` with each new piece."""
        ...
