"""One adapter per vision-encoder family, registered by Hugging Face ``model_type``.

Also built-in presets and checkpoint loading: the only code that knows transformers classes.

Families: Qwen2-VL (``qwen2_vl``), InternVL3 (``internvl``), LLaVA-1.5 and LLaVA-NeXT with
CLIP (``llava``, ``llava_next``),
PaliGemma with SigLIP (``paligemma``), Qwen2.5-VL (``qwen2_5_vl``).
"""

from ipcv_deploy.models.base import (
    FamilyAdapter,
    ImageSize,
    adapter_for_module,
    get_adapter,
    native_families,
    register_adapter,
    supported_model_types,
)
from ipcv_deploy.models.internvl import InternVLAdapter
from ipcv_deploy.models.llava import LlavaAdapter, LlavaNextAdapter
from ipcv_deploy.models.presets import (
    BENCHMARK_PRESETS,
    DEFAULT_PRESET,
    DEVICES,
    DTYPES,
    KERNEL_BENCHMARK_PRESET,
    MEGAPIXEL_INPUTS,
    NATIVE_BENCHMARK_PRESETS,
    PRESETS,
    RUNTIME_BENCHMARK_PRESET,
    SERVE_BENCHMARK_PRESET,
    LoadedModel,
    ModelPreset,
    load_model,
    parse_dtype,
    resolve_device,
    synchronize,
)
from ipcv_deploy.models.qwen2_5_vl import Qwen25VLAdapter
from ipcv_deploy.models.qwen2_vl import Qwen2VLAdapter
from ipcv_deploy.models.siglip import SiglipAdapter

__all__ = [
    "BENCHMARK_PRESETS",
    "DEFAULT_PRESET",
    "DEVICES",
    "DTYPES",
    "KERNEL_BENCHMARK_PRESET",
    "MEGAPIXEL_INPUTS",
    "NATIVE_BENCHMARK_PRESETS",
    "PRESETS",
    "RUNTIME_BENCHMARK_PRESET",
    "SERVE_BENCHMARK_PRESET",
    "FamilyAdapter",
    "ImageSize",
    "InternVLAdapter",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "LoadedModel",
    "ModelPreset",
    "Qwen2VLAdapter",
    "Qwen25VLAdapter",
    "SiglipAdapter",
    "adapter_for_module",
    "get_adapter",
    "load_model",
    "native_families",
    "parse_dtype",
    "register_adapter",
    "resolve_device",
    "supported_model_types",
    "synchronize",
]
