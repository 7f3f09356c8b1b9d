"""The plugin library's C API (``plugins/include/ipcv_kernels.h``): built with g++, ctypes.

The TensorRT plugins launch the ahead-of-time compiled Triton kernels
(``ipcv_deploy.kernels.aot``) through this C API; ``build_kernel_library`` builds the same
launchers into ``libipcv_kernels.so`` with a plain C++ compiler (no nvcc, no CUDA toolkit, no
GPU: the driver API types come from the triton wheel's ``cuda.h``) and ``KernelLibrary`` calls
them on torch CUDA tensors, on torch's current stream.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from ipcv_deploy.errors import BackendUnavailableError, InputError

__all__ = [
    "IPCV_ERROR_INVALID_VALUE",
    "IPCV_ERROR_NO_DRIVER",
    "IPCV_ERROR_NO_IMAGE",
    "LAUNCHER_SOURCES",
    "PLUGIN_DIR",
    "KernelLibrary",
    "build_kernel_library",
    "cuda_header_dir",
]

PLUGIN_DIR = Path(__file__).resolve().parents[2] / "plugins"
#: The hand-written launcher sources (plugins/src); the AOT build generates the rest.
LAUNCHER_SOURCES = ("ipcv_kernels.cpp", "aot_launcher.cpp")
#: ``IpcvStatus`` values of ipcv_kernels.h (other non-zero values are CUresults).
IPCV_ERROR_INVALID_VALUE = 1
IPCV_ERROR_NO_DRIVER = -1
IPCV_ERROR_NO_IMAGE = -2
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def cuda_header_dir() -> Path:
    """Directory of ``cuda.h``: ``$IPCV_CUDA_INCLUDE``, else the one bundled with triton.

    Raises:
        BackendUnavailableError: neither has ``cuda.h``.
    """
    candidates = [os.environ.get("IPCV_CUDA_INCLUDE")]
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "include"))
    except ImportError:
        pass
    for candidate in candidates:
        if candidate and (Path(candidate) / "cuda.h").is_file():
            return Path(candidate)
    raise BackendUnavailableError(
        "cuda.h not found: install triton (it bundles the header) or set IPCV_CUDA_INCLUDE"
    )


def build_kernel_library(
    out_dir: Path,
    archs: Sequence[int] | None = None,
    aot_dir: Path | None = None,
    jobs: int = 1,
) -> Path:
    """Build ``out_dir/libipcv_kernels.so``: AOT-compile the kernels, then g++ the launchers.

    Args:
        out_dir: output directory (created); the generated sources go to ``out_dir/aot``.
        archs: compute capabilities to compile for (default: ``aot.DEFAULT_ARCHS``).
        aot_dir: reuse the output of an earlier ``compile_kernels`` instead of compiling.
        jobs: parallel Triton compile processes.

    Raises:
        BackendUnavailableError: no C++ compiler (``$CXX`` or g++), no triton or no cuda.h.
        RuntimeError: the compiler failed (its output is in the message).
    """
    from ipcv_deploy.kernels import aot

    compiler = os.environ.get("CXX") or shutil.which("g++")
    if not compiler:
        raise BackendUnavailableError("no C++ compiler: install g++ or set CXX")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if aot_dir is None:
        aot_dir = out_dir / "aot"
        aot.compile_kernels(aot_dir, archs or aot.DEFAULT_ARCHS, jobs=jobs)
    target = out_dir / "libipcv_kernels.so"
    with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    command = [
        compiler, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared",
        "-fvisibility=hidden", "-isystem", str(cuda_header_dir()),
        f"-I{PLUGIN_DIR / 'include'}", f"-I{PLUGIN_DIR / 'src'}", f"-I{aot_dir}",
        *(str(PLUGIN_DIR / "src" / name) for name in LAUNCHER_SOURCES),
        str(Path(aot_dir) / aot.SOURCE_NAME), "-ldl", "-o", str(partial),
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr}")
    os.replace(partial, target)
    return target


class KernelLibrary:
    """ctypes bindings of the C API, with the ``ipcv_deploy.ops`` signatures on CUDA tensors.

    Loads ``libipcv_kernels.so`` or the plugin library (which exports the same launchers).
    ``lib`` is the raw ``ctypes.CDLL`` with typed functions; ``status_string(code)`` explains
    a launcher result.
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
        lib.ipcv_status_string.argtypes = [ctypes.c_int]
        lib.ipcv_status_string.restype = ctypes.c_char_p
        self.lib = lib

    def status_string(self, code: int) -> str:
        """The library's one-line description of a launcher result."""
        return self.lib.ipcv_status_string(code).decode()

    def _check(self, code: int, op: str) -> None:
        if code == 0:
            return
        message = f"{op}: {self.status_string(code)} (code {code})"
        if code == IPCV_ERROR_INVALID_VALUE:
            raise InputError(f"{message}; see the limits in plugins/include/ipcv_kernels.h")
        if code in (IPCV_ERROR_NO_DRIVER, IPCV_ERROR_NO_IMAGE):
            raise BackendUnavailableError(message)
        raise RuntimeError(message)

    @staticmethod
    def _stream() -> ctypes.c_void_p:
        return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)

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
        """``ops.token_select`` through the C API."""
        dtype = self._float(h_prev, h_cur)
        h_prev, h_cur = h_prev.contiguous(), h_cur.contiguous()
        batch, tokens, width = h_cur.shape
        device = h_cur.device
        keep = torch.empty(batch, num_keep, dtype=torch.int64, device=device)
        drop = torch.empty(batch, max(tokens - num_keep, 0), dtype=torch.int64, device=device)
        work_bytes = self.lib.ipcv_token_select_workspace(batch, tokens)
        work = torch.empty(work_bytes, dtype=torch.uint8, device=device)
        code = self.lib.ipcv_token_select(
            h_prev.data_ptr(), h_cur.data_ptr(), dtype, batch, tokens, width, num_keep,
            num_prefix, keep.data_ptr(), drop.data_ptr(), work.data_ptr(), self._stream(),
        )  # fmt: skip
        self._check(code, "TokenSelect")
        return keep, drop

    def neighbor_index(
        self, x_keep: torch.Tensor, x_drop: torch.Tensor, num_neighbors: int
    ) -> torch.Tensor:
        """``ops.neighbor_index`` through the C API."""
        dtype = self._float(x_keep, x_drop)
        x_keep, x_drop = x_keep.contiguous(), x_drop.contiguous()
        batch, kept, width = x_keep.shape
        dropped = x_drop.shape[1]
        nbr = torch.empty(batch, dropped, num_neighbors, dtype=torch.int64, device=x_keep.device)
        work_bytes = self.lib.ipcv_neighbor_index_workspace(batch, kept)
        work = torch.empty(work_bytes, dtype=torch.uint8, device=x_keep.device)
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
        """``ops.neighbor_reconstruct`` through the C API."""
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
