"""Shared fixtures: tiny seeded models per family, their inputs, and their exports."""

from __future__ import annotations

import fcntl
import hashlib
import os

# The Triton kernels run on CPU tensors through Triton's interpreter unless
# TRITON_INTERPRET=0 (then on CUDA). triton reads the variable when it decorates a kernel, its
# own library included, so it is set before anything imports triton (torch._dynamo, which
# transformers imports, does).
os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.utils import logging as hf_logging

from ipcv_deploy.artifact import Artifact
from ipcv_deploy.models import FamilyAdapter, LoadedModel, load_model

hf_logging.set_verbosity_error()

TINY = ("tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-internvl", "tiny-llava", "tiny-paligemma")
#: Presets whose towers run the tower-level tests (LLaVA-NeXT's anyres prompt is tested apart).
TOWERS = (*TINY, "tiny-llava-next")
#: The pixel range of the tests' native-resolution exports (``exports(name, **NATIVE)``):
#: 56x56 .. 0.1 MP, 32 .. 512 patches once an image must keep k = 10 tokens.
NATIVE_MAX_PIXELS = 512 * 14 * 14


@dataclass
class Tiny:
    """A freshly built tiny model, its bound adapter and seeded inputs for ``batch`` images."""

    loaded: LoadedModel
    adapter: FamilyAdapter
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def dense(self) -> torch.Tensor:
        with torch.no_grad():
            return self.adapter.features(self.loaded.vision(*self.args, **self.kwargs))


def make_tiny(name: str, batch: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0) -> Tiny:
    loaded = load_model(name, dtype=dtype, seed=seed)
    adapter = loaded.adapter(loaded.vision)
    gen = torch.Generator().manual_seed(seed + 1)
    args, kwargs = adapter.example_inputs(loaded.image_size, batch, gen)
    return Tiny(loaded, adapter, args, kwargs)


@pytest.fixture(params=TOWERS)
def tiny(request: pytest.FixtureRequest) -> Tiny:
    """Each tiny family, batch of 2, fp32."""
    return make_tiny(request.param)


def export_tiny(name: str, out: Path, dense: bool = False, **options) -> Artifact:
    from ipcv_deploy.export import ExportOptions, export_encoder

    loaded = load_model(name, dtype=torch.float32, seed=0)
    config = None if dense else loaded.adapter.reference_ipcv()
    return export_encoder(loaded, ExportOptions(loaded.image_size, config, **options), out)


Exports = Callable[..., Artifact]


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> Exports:
    """``exports(name, dense=False, **options)``: each distinct export made once per run.

    ``quantize=...`` quantizes the (cached) fp32 export with ``quantize_artifact``, the step
    ``export --quantize`` ends with. Treat the result as read-only (copy it to change it).
    Under pytest-xdist the workers share one cache directory: the first to need an export
    makes it (under a file lock), the others load it from disk.
    """
    from ipcv_deploy.artifact import load_artifact
    from ipcv_deploy.export.quantize import quantize_artifact

    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    root = tmp_path_factory.getbasetemp()
    root = (root.parent if shared else root) / "artifacts"
    root.mkdir(exist_ok=True)
    made: dict[tuple, Artifact] = {}

    def get(name: str, dense: bool = False, quantize: str = "none", **options) -> Artifact:
        key = (name, dense, quantize, tuple(sorted(options.items())))
        if key in made:
            return made[key]
        fp32 = None if quantize == "none" else get(name, dense, **options)
        out = root / f"export-{hashlib.sha256(repr(key).encode()).hexdigest()[:16]}"
        with (root / f"{out.name}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if out.exists():
                made[key] = load_artifact(out, check="size")
            elif fp32 is None:
                made[key] = export_tiny(name, out, dense=dense, **options)
            else:
                made[key] = quantize_artifact(fp32, out, quantize)
        return made[key]

    return get


@pytest.fixture(params=TINY)
def ipcv_artifact(request, exports) -> Artifact:
    """Each tiny family, IPCV at the reference settings, both flavours, kept indices out."""
    return exports(request.param, return_indices=True)


@pytest.fixture(params=TINY)
def dense_artifact(request, exports) -> Artifact:
    """Each tiny family, dense, ONNX Runtime flavour only."""
    return exports(request.param, dense=True, target="ort")


def hf_image_features(loaded: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
    """What the transformers model hands its LLM for row-form ``pixels`` (one image per row)."""
    with torch.no_grad():
        if loaded.adapter.head_is_projector:  # Qwen: packed patches + grid, as the processor gives
            side = loaded.image_size[0] // loaded.vision.config.patch_size
            grid = torch.tensor([[1, side, side]] * pixels.shape[0])
            out = loaded.vision(pixels.flatten(0, 1), grid_thw=grid).pooler_output
            return out.view(pixels.shape[0], -1, out.shape[-1])
        features = loaded.model.model.get_image_features(pixels).pooler_output
        return torch.stack(features) if isinstance(features, (list, tuple)) else features
