"""Run a built engine behind the ``VisionBackend`` interface.

``execute_async_v3`` on torch CUDA tensors, on torch's current stream; the outputs stay on
the GPU as torch CUDA tensors (``to_host=True`` copies them to the CPU). Each call runs in the
first optimization profile that holds its size (images per call, or patches per image for a
native-resolution engine).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ipcv_deploy.backends.torch_backend import join_images, split_images
from ipcv_deploy.errors import ArtifactError, InputError
from ipcv_deploy.trt.builder import gpu_sm, import_tensorrt, load_plugin_library
from ipcv_deploy.trt.engine import ENGINE_FILE, PLUGIN_LIBRARY, Profile, read_engine_manifest

__all__ = ["TrtBackend", "check_engine_fits"]

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_engine_fits(manifest: dict, tensorrt_version: str, sm: str, engine_dir: Path) -> None:
    """Refuse an engine built for another TensorRT version or GPU."""
    key = manifest["key"]
    if key["tensorrt_version"] != tensorrt_version or key["gpu_sm"] != sm:
        raise ArtifactError(
            f"{engine_dir} was built for TensorRT {key['tensorrt_version']} on SM {key['gpu_sm']}; "
            f"this machine has TensorRT {tensorrt_version} on SM {sm}: rebuild it with "
            "`ipcv-export build`"
        )


class TrtBackend:
    """A deserialized engine; takes CUDA (or CPU) pixels, returns outputs by name.

    Args:
        engine_dir: directory written by ``ipcv-export build``.
        to_host: copy the outputs to the CPU (default: they stay on the CUDA device).
    """

    name = "tensorrt"

    def __init__(self, engine_dir: Path, to_host: bool = False) -> None:
        manifest = read_engine_manifest(engine_dir)
        if manifest is None:
            raise ArtifactError(f"{engine_dir} holds no engine; build one with `ipcv-export build`")
        trt = import_tensorrt()
        check_engine_fits(manifest, trt.__version__, gpu_sm(), engine_dir)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self._logger)
        self._plugins = load_plugin_library(
            trt, self.runtime.get_plugin_registry(), engine_dir / PLUGIN_LIBRARY
        )
        self.engine = self.runtime.deserialize_cuda_engine((engine_dir / ENGINE_FILE).read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT could not deserialize {engine_dir / ENGINE_FILE}")
        self.context = self.engine.create_execution_context()
        self.manifest = manifest
        self.to_host = to_host
        self.input = manifest["inputs"][0]
        self.native = manifest.get("native")
        self.output_names = tuple(o["name"] for o in manifest["outputs"])
        self._dtypes = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.bfloat16: torch.bfloat16,
            trt.int64: torch.int64,
            trt.int32: torch.int32,
        }

    def _profile(self, size: int) -> int:
        """The first optimization profile whose range holds dim 0 = ``size``."""
        profiles = [Profile(*p) for p in self.manifest["key"]["profiles"]]
        for index, profile in enumerate(profiles):
            if profile.fits(size):
                return index
        ranges = ", ".join(f"{p.min}..{p.max}" for p in profiles)
        unit = "patches per image" if self.native else "images per call"
        raise InputError(
            f"{size} {unit} is outside every optimization profile of this engine ({ranges}); "
            "rebuild with a --profile that covers it"
        )

    def __call__(
        self, pixels: torch.Tensor, grid: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Run the engine in the optimization profile that fits each call.

        Fixed size: [B, ...] pixels. Native: the processor's pixels with their grid, one
        execution per image.
        """
        if self.native is None:
            want = tuple(self.input["shape"][1:])
            if tuple(pixels.shape[1:]) != want:
                raise InputError(
                    f"pixels {tuple(pixels.shape)} do not fit this engine ([batch, {want}])"
                )
            return self._run({self.input["name"]: pixels})
        if grid is None:
            raise InputError("this engine is native-resolution: pass image_grid_thw too")
        grid_name = self.manifest["inputs"][1]["name"]
        parts = [
            tuple(self._run({self.input["name"]: p, grid_name: g}).values())
            for p, g in split_images(pixels, grid, self.native)
        ]
        return join_images(self.output_names, parts)

    def _run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = torch.device("cuda", torch.cuda.current_device())
        stream = torch.cuda.current_stream()
        pixels = feeds[self.input["name"]]
        profile = self._profile(int(pixels.shape[0]))
        if profile != self.context.active_optimization_profile:
            self.context.set_optimization_profile_async(profile, stream.cuda_stream)
        keep = []  # the device copies must live until the run ends
        for name, value in feeds.items():
            dtype = _TORCH_DTYPES.get(self.input["dtype"]) if name == self.input["name"] else None
            feed = value.to(device, dtype or torch.int64).contiguous()
            keep.append(feed)
            self.context.set_input_shape(name, tuple(feed.shape))
            self.context.set_tensor_address(name, feed.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = self._dtypes[self.engine.get_tensor_dtype(name)]
            outputs[name] = torch.empty(shape, dtype=dtype, device=device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ArtifactError("TensorRT execution failed (see the TensorRT log)")
        stream.synchronize()
        if self.to_host:
            return {name: value.cpu() for name, value in outputs.items()}
        return outputs
