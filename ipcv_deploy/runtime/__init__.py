"""Runtime: a vision backend stitched to the LLM, with LLM-side pruning, for answers.

``VLMPipeline`` (image + prompt -> streamed answer, batched), ``generate`` (prefill with
optional DART / FastV / TokenCarve pruning, then decoding), the vision backends
(``torch_vision``, ``artifact_vision``) and the VQA evaluation loop (``runtime.evaluate``).
"""

from ipcv_deploy.runtime.generate import Generation, LLMInputs, SamplingConfig, generate
from ipcv_deploy.runtime.pipeline import RunResult, VLMPipeline, load_image
from ipcv_deploy.runtime.vision import VISION_BACKENDS, VisionEncoder, artifact_vision, torch_vision

__all__ = [
    "VISION_BACKENDS",
    "Generation",
    "LLMInputs",
    "RunResult",
    "SamplingConfig",
    "VLMPipeline",
    "VisionEncoder",
    "artifact_vision",
    "generate",
    "load_image",
    "torch_vision",
]
