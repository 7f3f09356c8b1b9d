"""Runtime: a vision backend stitched to an LLM backend, for answers.

Three LLM backends answer through one interface (``LLMBackend.answer`` -> ``Answer``):
``VLMPipeline`` (transformers, the reference: image + prompt -> streamed answer, batched,
with LLM-side pruning by ``runtime.generate.generate``), ``GenaiPipeline``
(``runtime.ort_genai``: an ONNX Runtime GenAI package, without torch or transformers) and
``VllmClient`` (``runtime.vllm_client``: our encoder here, a vLLM server for the LLM). Also
the vision backends (``torch_vision``, ``artifact_vision``) and the VQA evaluation loop
(``runtime.evaluate``). Names load their modules when first used, so ``runtime.ort_genai``
imports without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "Answer": "answers",
    "LLMBackend": "answers",
    "SamplingConfig": "answers",
    "Generation": "generate",
    "LLMInputs": "generate",
    "EncodedBatch": "pipeline",
    "RunResult": "pipeline",
    "VLMPipeline": "pipeline",
    "load_image": "pipeline",
    "VISION_BACKENDS": "vision",
    "VisionEncoder": "vision",
    "artifact_vision": "vision",
    "torch_vision": "vision",
    "GenaiPipeline": "ort_genai",
    "VllmClient": "vllm_client",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
