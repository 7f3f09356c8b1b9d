"""Artifacts of the tiny presets, exported once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ipcv_deploy.artifact import Artifact
from ipcv_deploy.export import ExportOptions, export_encoder
from ipcv_deploy.models import load_model
from tests.conftest import TINY


def export_tiny(name: str, out: Path, dense: bool = False, **options) -> Artifact:
    loaded = load_model(name, dtype=torch.float32, seed=0)
    config = None if dense else loaded.adapter.reference_ipcv()
    return export_encoder(loaded, ExportOptions(loaded.image_size, config, **options), out)


@pytest.fixture(scope="session", params=TINY)
def ipcv_artifact(request, tmp_path_factory) -> Artifact:
    """Each tiny family, IPCV at the reference settings, both flavours, kept indices out."""
    out = tmp_path_factory.mktemp("artifacts") / f"{request.param}-ipcv"
    return export_tiny(request.param, out, return_indices=True)


@pytest.fixture(scope="session", params=TINY)
def dense_artifact(request, tmp_path_factory) -> Artifact:
    """Each tiny family, dense, ONNX Runtime flavour only."""
    out = tmp_path_factory.mktemp("artifacts") / f"{request.param}-dense"
    return export_tiny(request.param, out, dense=True, target="ort")
