"""Input checks and constants shared by the Triton ``ipcv`` kernels' host functions."""

from __future__ import annotations

import torch
import triton

from ipcv_deploy.errors import BackendUnavailableError, InputError

__all__ = [
    "FLOAT_TYPES",
    "I32_LIMIT",
    "INTERPRETED",
    "check_device",
    "check_floats",
    "check_i32",
    "check_rank",
]

#: Triton pointer type per float dtype; kernels that read floats are compiled once per entry.
FLOAT_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
#: Offsets inside kernels are i32.
I32_LIMIT = 2**31

# triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when this module is imported.
INTERPRETED = bool(triton.knobs.runtime.interpret)


def check_device(*tensors: torch.Tensor) -> None:
    """All tensors on one CUDA device, or on the CPU under Triton's interpreter.

    Raises:
        InputError: the tensors are on different devices.
        BackendUnavailableError: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise InputError(f"tensors on {sorted(map(str, devices))}: move them to one device")
    device = devices.pop()
    if device.type == "cpu" and not INTERPRETED:
        raise BackendUnavailableError(
            "the ipcv Triton kernels need CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 "
            "before triton is imported"
        )
    if device.type not in ("cpu", "cuda"):
        raise BackendUnavailableError(f"the ipcv Triton kernels run on CUDA, not {device.type}")


def check_floats(**tensors: torch.Tensor) -> torch.dtype:
    """One float dtype (fp32/fp16/bf16) shared by all ``tensors``; returns it.

    Raises:
        InputError: another dtype, or the tensors disagree.
    """
    dtypes = {t.dtype for t in tensors.values()}
    names = ", ".join(tensors)
    if len(dtypes) != 1:
        raise InputError(f"{names} have dtypes {sorted(map(str, dtypes))}: cast them to one")
    dtype = dtypes.pop()
    if dtype not in FLOAT_TYPES:
        raise InputError(f"{names} are {dtype}: use float32, float16 or bfloat16")
    return dtype


def check_rank(rank: int, **tensors: torch.Tensor) -> None:
    """Every tensor has ``rank`` dimensions.

    Raises:
        InputError: one does not.
    """
    for name, t in tensors.items():
        if t.dim() != rank:
            raise InputError(f"{name} has shape {tuple(t.shape)}: want {rank} dimensions")


def check_i32(what: str, elements: int) -> None:
    """``elements`` fits the kernels' i32 offsets.

    Raises:
        InputError: it does not.
    """
    if elements >= I32_LIMIT:
        raise InputError(
            f"{what} has {elements} elements, the kernels take < 2^31: split the batch"
        )
