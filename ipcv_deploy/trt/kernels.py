"""The CUDA kernels of the ``ipcv`` ops, built with nvcc and called through ctypes.

The TensorRT plugins call the same C launchers (``plugins/include/ipcv_kernels.h``); this
module lets the kernels be compiled and tested against the PyTorch reference ops without
TensorRT, on torch CUDA tensors.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch

from ipcv_deploy.errors import BackendUnavailableError, InputError

__all__ = [
    "KERNEL_SOURCES",
    "PLUGIN_DIR",
    "CudaKernels",
    "build_kernel_library",
    "cuda_include_dir",
    "find_nvcc",
]

PLUGIN_DIR = Path(__file__).resolve().parents[2] / "plugins"
KERNEL_SOURCES = ("token_select.cu", "neighbor_index.cu", "neighbor_reconstruct.cu")
#: Orin (87), Ada / L4 (89), Hopper (90), Thor (110 in CUDA 13; 101 in CUDA 12.8-12.9).
DEFAULT_ARCHS = ("sm_87", "sm_89", "sm_90", "sm_110")
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def find_nvcc() -> str:
    """Path of nvcc (``$CUDACXX``, ``PATH``, ``/usr/local/cuda/bin``).

    Raises:
        BackendUnavailableError: no nvcc.
    """
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise BackendUnavailableError(
        "nvcc not found; install the CUDA toolkit or set CUDACXX to compile the ipcv kernels"
    )


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include directory (``$CUDA_HOME``, ``$CUDA_PATH``, /usr/local/cuda)."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_runtime_api.h").is_file():
            return Path(root) / "include"
    return None


def build_kernel_library(out_dir: Path, archs: Sequence[str] = DEFAULT_ARCHS) -> Path:
    """Compile the kernels into ``out_dir/libipcv_kernels.so`` with nvcc.

    Raises:
        BackendUnavailableError: no nvcc.
        RuntimeError: nvcc failed (its output is in the message).
    """
    nvcc = find_nvcc()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "libipcv_kernels.so"
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in archs]
    command = [
        nvcc,
        "-O3",
        "-std=c++17",
        "-shared",
        "-Xcompiler",
        "-fPIC",
        *gencode,
        f"-I{PLUGIN_DIR / 'include'}",
        *(str(PLUGIN_DIR / "src" / name) for name in KERNEL_SOURCES),
        "-o",
        str(target),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"nvcc failed ({' '.join(command)}):\n{proc.stderr}")
    return target


class CudaKernels:
    """ctypes bindings of the kernel launchers, with the ``ops.torch_ops`` signatures.

    Loads ``libipcv_kernels.so`` or the plugin library (which exports the same launchers) and
    runs on CUDA tensors, on torch's current stream.
    """

    def __init__(self, library: Path) -> None:
        if not Path(library).is_file():
            raise BackendUnavailableError(
                f"kernel library {library} not found; build it with build_kernel_library()"
            )
        lib = ctypes.CDLL(str(library))
        ptr, i64, size = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
        lib.ipcv_token_select_workspace.argtypes = [i64, i64]
        lib.ipcv_token_select_workspace.restype = size
        lib.ipcv_token_select.argtypes = [ptr, ptr, ctypes.c_int, *[i64] * 5, ptr, ptr, ptr, ptr]
        lib.ipcv_neighbor_index_workspace.argtypes = [i64, i64]
        lib.ipcv_neighbor_index_workspace.restype = size
        lib.ipcv_neighbor_index.argtypes = [ptr, ptr, ctypes.c_int, *[i64] * 5, ptr, ptr, ptr]
        lib.ipcv_neighbor_reconstruct.argtypes = [*[ptr] * 6, ctypes.c_int, *[i64] * 5, ptr, ptr]
        for fn in (lib.ipcv_token_select, lib.ipcv_neighbor_index, lib.ipcv_neighbor_reconstruct):
            fn.restype = ctypes.c_int
        self.lib = lib

    @staticmethod
    def _stream() -> ctypes.c_void_p:
        return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)

    @staticmethod
    def _check(code: int, op: str) -> None:
        if code:
            raise InputError(
                f"{op} kernel failed with CUDA error {code} (see ipcv_kernels.h limits)"
            )

    @staticmethod
    def _float(*tensors: torch.Tensor) -> int:
        dtype = tensors[0].dtype
        if dtype not in _DTYPES or any(t.dtype != dtype or not t.is_cuda for t in tensors):
            raise InputError(
                "kernel inputs must be CUDA tensors of one float type (fp32/fp16/bf16)"
            )
        return _DTYPES[dtype]

    def token_select(
        self, h_prev: torch.Tensor, h_cur: torch.Tensor, num_keep: int, num_prefix: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``ops.token_select`` on the GPU."""
        dtype = self._float(h_prev, h_cur)
        h_prev, h_cur = h_prev.contiguous(), h_cur.contiguous()
        batch, tokens, width = h_cur.shape
        keep = torch.empty(batch, num_keep, dtype=torch.int64, device=h_cur.device)
        drop = torch.empty(batch, tokens - num_keep, dtype=torch.int64, device=h_cur.device)
        work = torch.empty(
            self.lib.ipcv_token_select_workspace(batch, tokens),
            dtype=torch.uint8,
            device=h_cur.device,
        )
        code = self.lib.ipcv_token_select(
            h_prev.data_ptr(), h_cur.data_ptr(), dtype, batch, tokens, width, num_keep,
            num_prefix, keep.data_ptr(), drop.data_ptr(), work.data_ptr(), self._stream(),
        )  # fmt: skip
        self._check(code, "TokenSelect")
        return keep, drop

    def neighbor_index(
        self, x_keep: torch.Tensor, x_drop: torch.Tensor, num_neighbors: int
    ) -> torch.Tensor:
        """``ops.neighbor_index`` on the GPU."""
        dtype = self._float(x_keep, x_drop)
        x_keep, x_drop = x_keep.contiguous(), x_drop.contiguous()
        batch, kept, width = x_keep.shape
        dropped = x_drop.shape[1]
        nbr = torch.empty(batch, dropped, num_neighbors, dtype=torch.int64, device=x_keep.device)
        work = torch.empty(
            self.lib.ipcv_neighbor_index_workspace(batch, kept),
            dtype=torch.uint8,
            device=x_keep.device,
        )
        code = self.lib.ipcv_neighbor_index(
            x_keep.data_ptr(), x_drop.data_ptr(), dtype, batch, kept, dropped, width,
            num_neighbors, nbr.data_ptr(), work.data_ptr(), self._stream(),
        )  # fmt: skip
        self._check(code, "NeighborIndex")
        return nbr

    def neighbor_reconstruct(
        self,
        x_keep: torch.Tensor,
        x0_keep: torch.Tensor,
        x0_drop: torch.Tensor,
        nbr: torch.Tensor,
        keep_idx: torch.Tensor,
        drop_idx: torch.Tensor,
    ) -> torch.Tensor:
        """``ops.neighbor_reconstruct`` on the GPU."""
        dtype = self._float(x_keep, x0_keep, x0_drop)
        tensors = [t.contiguous() for t in (x_keep, x0_keep, x0_drop, nbr, keep_idx, drop_idx)]
        batch, kept, width = x_keep.shape
        dropped, k = nbr.shape[1], nbr.shape[2]
        full = torch.empty(batch, kept + dropped, width, dtype=x_keep.dtype, device=x_keep.device)
        code = self.lib.ipcv_neighbor_reconstruct(
            *(t.data_ptr() for t in tensors), dtype, batch, kept, dropped, width, k,
            full.data_ptr(), self._stream(),
        )  # fmt: skip
        self._check(code, "NeighborReconstruct")
        return full
