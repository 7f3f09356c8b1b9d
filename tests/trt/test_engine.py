"""Build settings, profiles, the cache rule, and the errors a build gives without TensorRT."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest

from ipcv_deploy.cli import main
from ipcv_deploy.errors import ArtifactError, BackendUnavailableError, ConfigError
from ipcv_deploy.trt.builder import load_plugin_library
from ipcv_deploy.trt.engine import (
    ENGINE_FILE,
    ENGINE_MANIFEST,
    BuildSettings,
    Platform,
    Profile,
    engine_key,
    read_engine_manifest,
    read_platform,
    rebuild_reason,
)
from ipcv_deploy.trt.runner import check_engine_fits

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_batch_profiles():
    assert Profile.parse("1:4:8") == Profile(1, 4, 8)
    assert Profile.parse("4") == Profile(1, 4, 4)
    assert Profile(1, 2, 4).shapes(("batch", 1024, 1176)) == (
        (1, 1024, 1176),
        (2, 1024, 1176),
        (4, 1024, 1176),
    )
    for bad in ("0:1:2", "4:2:8", "1:2", "big"):
        with pytest.raises(ConfigError):
            Profile.parse(bad)
    with pytest.raises(ConfigError, match=r"precision must be one of"):
        BuildSettings("int8")


@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "libipcv_trt_plugins.so"
    path.write_bytes(b"plugin build 1")
    return path


def _key(artifact, plugin, **changes):
    settings = BuildSettings(
        changes.pop("precision", "fp16"), changes.pop("profiles", (Profile(1, 1, 4),))
    )
    platform = Platform(changes.pop("trt", "10.13.0"), changes.pop("sm", "8.7"), "12.6", None)
    return engine_key(artifact, settings, plugin, platform)


def _cached(tmp_path, key):
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir(exist_ok=True)
    (engine_dir / ENGINE_FILE).write_bytes(b"engine")
    (engine_dir / ENGINE_MANIFEST).write_text(json.dumps({"key": key.to_dict()}))
    return read_engine_manifest(engine_dir)


def test_engine_key_names_what_the_engine_depends_on(ipcv_artifact, plugin):
    key = _key(ipcv_artifact, plugin)
    files = ipcv_artifact.manifest.files
    assert key.onnx_sha256 == files["vision.trt.onnx"].sha256
    assert key.weights_sha256 == files["vision.onnx.data"].sha256
    assert key.profiles == ((1, 1, 4),) and key.precision == "fp16"


def test_cache_is_reused_only_when_nothing_changed(ipcv_artifact, plugin, tmp_path):
    key = _key(ipcv_artifact, plugin)
    cached = _cached(tmp_path, key)
    assert rebuild_reason(cached, key) is None
    assert rebuild_reason(None, key) == "no engine built yet"
    changes = {
        "TensorRT version": dataclasses.replace(key, tensorrt_version="10.14.0"),
        "GPU (SM)": dataclasses.replace(key, gpu_sm="9.0"),
        "CUDA driver": dataclasses.replace(key, cuda_driver="13.0"),
        "NVIDIA driver": dataclasses.replace(key, nvidia_driver="580.65.06"),
        "JetPack (L4T) release": dataclasses.replace(key, l4t_release="R38.2.0"),
        "precision": _key(ipcv_artifact, plugin, precision="bf16"),
        "optimization profiles": _key(ipcv_artifact, plugin, profiles=(Profile(1, 2, 8),)),
        "ONNX graph": dataclasses.replace(key, onnx_sha256="0" * 64),
        "weights": dataclasses.replace(key, weights_sha256="0" * 64),
    }
    for label, wanted in changes.items():
        assert rebuild_reason(cached, wanted).startswith(f"{label} differs"), label
    plugin.write_bytes(b"plugin build 2")
    assert rebuild_reason(cached, _key(ipcv_artifact, plugin)).startswith("plugin library differs")


def test_platform_is_read_from_the_driver_and_jetson_release_files(tmp_path):
    (tmp_path / "proc/driver/nvidia").mkdir(parents=True)
    (tmp_path / "proc/driver/nvidia/version").write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024\n"
        "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
    )
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text(
        "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
        "DATE: Wed Jan  8 01:49:37 UTC 2025\n"
    )
    platform = read_platform("10.13.0", "8.7", root=tmp_path)
    assert (platform.nvidia_driver, platform.l4t_release) == ("550.54.14", "R36.4.3")
    bare = read_platform("10.13.0", "8.7", root=tmp_path / "nothing")
    assert (bare.nvidia_driver, bare.l4t_release) == (None, None)


def test_corrupt_engine_manifest_means_rebuild(tmp_path):
    (tmp_path / ENGINE_FILE).write_bytes(b"engine")
    (tmp_path / ENGINE_MANIFEST).write_text("{broken")
    assert read_engine_manifest(tmp_path) is None


def test_engine_from_another_tensorrt_or_gpu_is_refused(ipcv_artifact, plugin, tmp_path):
    manifest = {"key": _key(ipcv_artifact, plugin).to_dict()}
    check_engine_fits(manifest, "10.13.0", "8.7", tmp_path)
    with pytest.raises(ArtifactError, match=r"built for TensorRT 10.13.0 on SM 8.7.*rebuild"):
        check_engine_fits(manifest, "10.13.0", "9.0", tmp_path)
    with pytest.raises(ArtifactError, match=r"TensorRT 10.14.0"):
        check_engine_fits(manifest, "10.14.0", "8.7", tmp_path)


def test_artifact_without_trt_flavour_cannot_key_an_engine(dense_artifact, plugin):
    with pytest.raises(ArtifactError, match=r"no TensorRT flavour.*--target trt"):
        _key(dense_artifact, plugin)


def test_missing_plugin_library_names_the_build_command(tmp_path):
    with pytest.raises(BackendUnavailableError, match=r"not found; build it: cmake -S plugins"):
        load_plugin_library(None, None, tmp_path / "libipcv_trt_plugins.so")


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_build_and_trt_verify_without_tensorrt_say_so(ipcv_artifact, capsys):
    assert main(["build", str(ipcv_artifact.path)]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err
    assert main(["verify", str(ipcv_artifact.path), "--backend", "trt"]) == 2
    assert "holds no engine" in capsys.readouterr().err


def test_build_refuses_an_artifact_without_trt_flavour(dense_artifact, capsys):
    assert main(["build", str(dense_artifact.path)]) == 2
    assert "no 'trt' flavour" in capsys.readouterr().err
