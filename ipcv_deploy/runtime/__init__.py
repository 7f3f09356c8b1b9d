"""Runtime: a vision backend stitched to an LLM backend, for answers.

``VLMPipeline`` (image + prompt -> streamed answer, batched; the transformers LLM backend,
with LLM-side pruning), ``runtime.generate.generate`` (prefill with optional DART / FastV /
TokenCarve pruning, then decoding), the vision backends (``torch_vision``,
``artifact_vision``), the VQA evaluation loop (``runtime.evaluate``) and ``GenaiPipeline``
(``runtime.ort_genai``: an ONNX Runtime GenAI package, without torch or transformers). Names
load their modules when first used, so ``runtime.ort_genai`` imports without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "Generation": "generate",
    "LLMInputs": "generate",
    "SamplingConfig": "generate",
    "RunResult": "pipeline",
    "VLMPipeline": "pipeline",
    "load_image": "pipeline",
    "VISION_BACKENDS": "vision",
    "VisionEncoder": "vision",
    "artifact_vision": "vision",
    "torch_vision": "vision",
    "GenaiPipeline": "ort_genai",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
