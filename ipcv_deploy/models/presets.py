"""Built-in models (seeded random weights from configs) and loading of local checkpoints."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    InternVLVisionConfig,
    InternVLVisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
)
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from ipcv_deploy.errors import (
    ArtifactError,
    BackendUnavailableError,
    ConfigError,
    UnsupportedModelError,
)
from ipcv_deploy.models import internvl, llava, qwen2_5_vl, qwen2_vl, siglip
from ipcv_deploy.models.base import FamilyAdapter, ImageSize, get_adapter

__all__ = [
    "BENCHMARK_PRESETS",
    "DEFAULT_PRESET",
    "DEVICES",
    "DTYPES",
    "NATIVE_BENCHMARK_PRESETS",
    "PRESETS",
    "RUNTIME_BENCHMARK_PRESET",
    "SERVE_BENCHMARK_PRESET",
    "LoadedModel",
    "ModelPreset",
    "load_model",
    "parse_dtype",
    "resolve_device",
    "synchronize",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class ModelPreset:
    """A built-in model: family, default image size, and how to build it with random weights."""

    name: str
    model_type: str
    image_size: ImageSize
    description: str
    build: Callable[[], nn.Module]
    #: True when ``build`` returns the whole multimodal model (LLM included), else the tower.
    full_model: bool


@dataclass
class LoadedModel:
    """A model ready for IPCV: its adapter class, vision tower, and the full model if any."""

    name: str
    adapter: type[FamilyAdapter]
    vision: nn.Module
    model: nn.Module | None
    image_size: ImageSize
    #: Seed of the random weights of a preset; ``None`` for a checkpoint.
    seed: int | None = None


def _full(cls_name: str, config_fn: Callable[[], object]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        adapter = get_adapter(cls_name)
        return adapter.full_model_class(config_fn())

    return build


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset(
            "tiny-qwen2-vl",
            "qwen2_vl",
            (224, 224),
            "12-block Qwen2-VL ViT (width 64) + 4-layer LLM, for tests and demo",
            _full("qwen2_vl", qwen2_vl.tiny_config),
            full_model=True,
        ),
        ModelPreset(
            "small-qwen2-vl",
            "qwen2_vl",
            (448, 448),
            "24-block Qwen2-VL ViT (width 256) + 4-layer LLM: the default of demo and run",
            _full("qwen2_vl", qwen2_vl.small_config),
            full_model=True,
        ),
        ModelPreset(
            "tiny-internvl",
            "internvl",
            (112, 112),
            "10-block InternViT (width 64) + 4-layer Qwen2 LLM, for tests and demo",
            _full("internvl", internvl.tiny_config),
            full_model=True,
        ),
        ModelPreset(
            "tiny-qwen2.5-vl",
            "qwen2_5_vl",
            (224, 224),
            "12-block Qwen2.5-VL ViT (width 64, 112px windows, 2 full blocks) + 4-layer LLM",
            _full("qwen2_5_vl", qwen2_5_vl.tiny_config),
            full_model=True,
        ),
        ModelPreset(
            "tiny-llava",
            "llava",
            (112, 112),
            "7-block CLIP ViT (width 64) + 4-layer Llama LLM, for tests",
            _full("llava", llava.tiny_config),
            full_model=True,
        ),
        ModelPreset(
            "tiny-llava-next",
            "llava_next",
            (112, 112),
            "tiny-llava's CLIP ViT and LLM as LLaVA-NeXT (anyres, up to 2x2 tiles), for tests",
            _full("llava_next", llava.tiny_next_config),
            full_model=True,
        ),
        ModelPreset(
            "tiny-paligemma",
            "paligemma",
            (112, 112),
            "6-block SigLIP ViT (width 64) + 4-layer Gemma LLM, for tests",
            _full("paligemma", siglip.tiny_config),
            full_model=True,
        ),
        ModelPreset(
            "qwen2-vl-2b",
            "qwen2_vl",
            (448, 448),
            "Qwen2-VL-2B shapes: 32-block ViT (675M) + 28-layer 1.5B LLM, random weights",
            _full("qwen2_vl", qwen2_vl.benchmark_2b_config),
            full_model=True,
        ),
        ModelPreset(
            "qwen2-vl-7b-vit",
            "qwen2_vl",
            (448, 448),
            "Qwen2-VL-7B vision tower (32 blocks, width 1280, 675M params), no LLM",
            lambda: Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig()),
            full_model=False,
        ),
        ModelPreset(
            "internvit-300m",
            "internvl",
            (448, 448),
            "InternViT-300M of InternVL3-8B (24 layers, width 1024), no LLM",
            lambda: InternVLVisionModel(
                InternVLVisionConfig(attention_bias=True, layer_scale_init_value=0.1)
            ),
            full_model=False,
        ),
        ModelPreset(
            "qwen2.5-vl-7b-vit",
            "qwen2_5_vl",
            (448, 448),
            "Qwen2.5-VL-7B vision tower (32 blocks, width 1280, windows + 4 full blocks), no LLM",
            lambda: Qwen2_5_VisionTransformerPretrainedModel(
                Qwen2_5_VLVisionConfig(
                    hidden_size=1280, intermediate_size=3420, out_hidden_size=3584
                )
            ),
            full_model=False,
        ),
        ModelPreset(
            "clip-vit-l-336",
            "llava",
            (336, 336),
            "CLIP ViT-L/14-336 of LLaVA-1.5 (24 layers, width 1024; features of layer 23), no LLM",
            lambda: llava.set_feature_layer(
                CLIPVisionModel(
                    CLIPVisionConfig(
                        hidden_size=1024,
                        intermediate_size=4096,
                        num_hidden_layers=24,
                        num_attention_heads=16,
                        image_size=336,
                        patch_size=14,
                        projection_dim=768,
                    )
                ),
                -2,  # LLaVA-1.5's vision_feature_layer
            ),
            full_model=False,
        ),
        ModelPreset(
            "siglip-so400m-224",
            "paligemma",
            (224, 224),
            "SigLIP So400m/14 of PaliGemma at 224 (27 layers, width 1152), no LLM",
            lambda: SiglipVisionModel(
                SiglipVisionConfig(
                    hidden_size=1152,
                    intermediate_size=4304,
                    num_hidden_layers=27,
                    num_attention_heads=16,
                    image_size=224,
                    patch_size=14,
                    vision_use_head=False,
                )
            ),
            full_model=False,
        ),
    )
}

#: What ``demo``, ``run`` and ``export`` use when no model is named.
DEFAULT_PRESET = "small-qwen2-vl"
#: The full-size towers ``bench`` measures when no model is named.
BENCHMARK_PRESETS = ("qwen2-vl-7b-vit", "internvit-300m")
#: ``bench --native``: the native-resolution towers.
NATIVE_BENCHMARK_PRESETS = ("qwen2-vl-7b-vit", "qwen2.5-vl-7b-vit")
#: The full model ``bench --runtime`` measures (vision + LLM) when no model is named.
RUNTIME_BENCHMARK_PRESET = "qwen2-vl-2b"
#: The model ``bench --serve`` serves when no model is named.
SERVE_BENCHMARK_PRESET = "tiny-qwen2-vl"
#: The tower whose shapes ``bench --kernels`` uses for the ops' roofline.
KERNEL_BENCHMARK_PRESET = "qwen2-vl-7b-vit"
#: About 1 MP as each benchmark tower's processor gives it: (image size, images per call).
MEGAPIXEL_INPUTS = {"qwen2-vl-7b-vit": ((1008, 1008), 1), "internvit-300m": ((448, 448), 5)}


def parse_dtype(name: str) -> torch.dtype:
    """``float32`` / ``float16`` / ``bfloat16`` to a torch dtype.

    Raises:
        ConfigError: for any other name.
    """
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}") from None


#: What ``--device`` takes: ``auto`` is ``cuda`` when torch sees a CUDA GPU, else ``cpu``.
DEVICES = ("cpu", "cuda", "auto")


def resolve_device(name: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` (``cuda:N``) or ``auto`` to a torch device that exists here.

    Raises:
        ConfigError: any other name.
        BackendUnavailableError: a CUDA device asked for where torch sees none.
    """
    text = str(name)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no CUDA GPU visible"
            raise BackendUnavailableError(
                f"--device {text}: CUDA is not available (torch {torch.__version__}, {build}); "
                "pass --device cpu (or auto), or install a CUDA build of torch on a GPU machine"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BackendUnavailableError(
                f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible; "
                "pass --device cuda:0"
            )
    return device


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work, so a clock read after it covers it (CUDA is async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_model(
    spec: str,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    weights: bool = True,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Build a preset with seeded random weights, or load a local Hugging Face checkpoint.

    Args:
        spec: a preset name (``PRESETS``) or a checkpoint directory (``save_pretrained`` output,
            safetensors weights).
        dtype: parameter dtype.
        seed: torch seed for the random weights of a preset.
        weights: ``False`` builds the architecture on the meta device only (no memory, no
            weights read): enough for shapes and FLOPs.
        device: where the model runs (``resolve_device``); weights are built or read on the
            CPU first, so a preset's seeded weights are the same on every device.

    Returns:
        The ``LoadedModel`` in eval mode.

    Raises:
        UnsupportedModelError: unknown preset, not a checkpoint, or an unsupported family.
        ArtifactError: a checkpoint without safetensors weights, or one that fails to load.
    """
    target = resolve_device(device) if weights else torch.device("meta")
    if spec in PRESETS:
        preset = PRESETS[spec]
        adapter = get_adapter(preset.model_type)
        torch.manual_seed(seed)
        with torch.device("cpu" if weights else "meta"):
            module = preset.build().to(dtype).eval()
        module.to(target)
        vision = adapter.vision_tower(module) if preset.full_model else module
        model = module if preset.full_model else None
        return LoadedModel(spec, adapter, vision, model, preset.image_size, seed)
    path = Path(spec)
    if not path.is_dir():
        raise UnsupportedModelError(
            f"unknown model {spec!r}: not a built-in preset ({', '.join(PRESETS)}) and not a "
            "local checkpoint directory; pass a preset name or a directory holding config.json"
        )
    loaded = _load_checkpoint(path, dtype, weights)
    if weights:
        loaded.model.to(target)
    return loaded


def _load_checkpoint(path: Path, dtype: torch.dtype, weights: bool) -> LoadedModel:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UnsupportedModelError(
            f"{path} has no config.json; pass a Hugging Face checkpoint directory "
            "(the output of save_pretrained)"
        )
    try:
        model_type = json.loads(config_file.read_text())["model_type"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ArtifactError(
            f"{config_file} is not a valid transformers config (no model_type); "
            "re-save the checkpoint with save_pretrained"
        ) from err
    if model_type == "internvl_chat":
        raise UnsupportedModelError(
            f"{path} is an original InternVL checkpoint (model_type 'internvl_chat', remote "
            "code); use its transformers conversion, e.g. OpenGVLab/InternVL3-8B-hf"
        )
    adapter = get_adapter(model_type)
    model_class = adapter.full_model_class
    if not weights:
        with torch.device("meta"):
            model = model_class(model_class.config_class.from_pretrained(path))
        return _loaded(path, adapter, model)
    if not any(path.glob("*.safetensors")):
        found = ", ".join(
            sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth"})
        )
        raise ArtifactError(
            f"{path} has no .safetensors weights (found: {found or 'none'}); IPCV loads "
            "safetensors only: load it once in transformers and save_pretrained() it again"
        )
    try:
        model = model_class.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise ArtifactError(f"could not load checkpoint {path}: {err}".splitlines()[0]) from err
    return _loaded(path, adapter, model)


def _loaded(path: Path, adapter: type[FamilyAdapter], model: nn.Module) -> LoadedModel:
    vision = adapter.vision_tower(model)
    return LoadedModel(str(path), adapter, vision, model.eval(), _default_image_size(vision))


def _default_image_size(vision: nn.Module) -> ImageSize:
    size = getattr(vision.config, "image_size", None)
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[1])
    if isinstance(size, int):
        return size, size
    return 448, 448  # Qwen2-VL / Qwen2.5-VL towers take any multiple of 28
