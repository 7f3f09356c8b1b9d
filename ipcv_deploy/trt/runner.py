"""Run a built engine behind the ``VisionBackend`` interface.

``execute_async_v3`` on torch CUDA tensors, on torch's current stream; the outputs stay on
the GPU as torch CUDA tensors (``to_host=True`` copies them to the CPU).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ipcv_deploy.errors import ArtifactError, InputError
from ipcv_deploy.trt.builder import gpu_sm, import_tensorrt, load_plugin_library
from ipcv_deploy.trt.engine import ENGINE_FILE, PLUGIN_LIBRARY, read_engine_manifest

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
        self.output_names = tuple(o["name"] for o in manifest["outputs"])
        self._dtypes = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.bfloat16: torch.bfloat16,
            trt.int64: torch.int64,
            trt.int32: torch.int32,
        }

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the engine on [B, ...] pixels."""
        want = tuple(self.input["shape"][1:])
        if tuple(pixels.shape[1:]) != want:
            raise InputError(
                f"pixels {tuple(pixels.shape)} do not fit this engine ([batch, {want}])"
            )
        device = torch.device("cuda", torch.cuda.current_device())
        feed = pixels.to(device, _TORCH_DTYPES[self.input["dtype"]]).contiguous()
        self.context.set_input_shape(self.input["name"], tuple(feed.shape))
        self.context.set_tensor_address(self.input["name"], feed.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = self._dtypes[self.engine.get_tensor_dtype(name)]
            outputs[name] = torch.empty(shape, dtype=dtype, device=device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ArtifactError("TensorRT execution failed (see the TensorRT log)")
        stream.synchronize()
        if self.to_host:
            return {name: value.cpu() for name, value in outputs.items()}
        return outputs
