"""Shared fixtures: tiny seeded models per family and their example inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from transformers.utils import logging as hf_logging

from ipcv_deploy.models import FamilyAdapter, LoadedModel, load_model

hf_logging.set_verbosity_error()

TINY = ("tiny-qwen2-vl", "tiny-internvl")


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


@pytest.fixture(params=TINY)
def tiny(request: pytest.FixtureRequest) -> Tiny:
    """Each tiny family, batch of 2, fp32."""
    return make_tiny(request.param)
