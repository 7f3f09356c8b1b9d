"""GPU benchmark of the ipcv CUDA kernels against the PyTorch reference ops on the same GPU.

For each op at full-size shapes: correctness against the reference, median time (CUDA
events), the reference op's time, and the memory-bandwidth floor (minimum bytes moved over
the device-to-device copy bandwidth measured in the same run).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ipcv_deploy.compression import gather_tokens
from ipcv_deploy.errors import BackendUnavailableError
from ipcv_deploy.models import BENCHMARK_PRESETS, load_model
from ipcv_deploy.ops import neighbor_index, neighbor_reconstruct, token_select
from ipcv_deploy.trt.kernels import CudaKernels

__all__ = ["KERNEL_HEADERS", "kernel_report", "kernel_shapes", "kernel_table"]

#: A shape beyond TensorRT's TopK limit: (label, batch, tokens, width, kept, prefix).
LARGE_SHAPE = ("16k tokens, keep 5000", 1, 16384, 1280, 5000, 0)


def kernel_shapes() -> list[tuple[str, int, int, int, int, int]]:
    """The benchmark encoders at their reference IPCV settings (batch 1 and 8), and a large case."""
    shapes = []
    for name in BENCHMARK_PRESETS:
        loaded = load_model(name, weights=False)
        adapter = loaded.adapter(loaded.vision)
        shape = adapter.encoder_shape(loaded.image_size)
        kept = loaded.adapter.reference_ipcv().kept_count(shape.tokens, shape.num_prefix)
        for batch in (1, 8):
            label = f"{name} x{batch}"
            shapes.append((label, batch, shape.tokens, shape.width, kept, shape.num_prefix))
    return [*shapes, LARGE_SHAPE]


def _cuda_ms(fn: Callable[[], object], runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _copy_gbps() -> float:
    """Device-to-device copy bandwidth (read + write) in GB/s."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _cuda_ms(lambda: dst.copy_(src), 10)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def _rows_for_shape(
    kernels: CudaKernels, shape: tuple, dtype: torch.dtype, gbps: float, runs: int
) -> list[dict[str, Any]]:
    label, batch, tokens, width, kept, prefix = shape
    size = torch.tensor([], dtype=dtype).element_size()
    gen = torch.Generator(device="cuda").manual_seed(0)
    h_prev, h_cur = (
        torch.randn(batch, tokens, width, generator=gen, device="cuda").to(dtype) for _ in range(2)
    )
    keep, drop = token_select(h_prev, h_cur, kept, prefix)
    x0_keep, x0_drop = gather_tokens(h_cur, keep), gather_tokens(h_cur, drop)
    nbr = neighbor_index(x0_keep, x0_drop, 10)
    args = (x0_keep * 1.1, x0_keep, x0_drop, nbr, keep, drop)
    got_keep, got_drop = kernels.token_select(h_prev, h_cur, kept, prefix)
    got_nbr = kernels.neighbor_index(x0_keep, x0_drop, 10)
    got_full = kernels.neighbor_reconstruct(*args)
    cases = {
        "TokenSelect": (
            lambda: kernels.token_select(h_prev, h_cur, kept, prefix),
            lambda: token_select(h_prev, h_cur, kept, prefix),
            2 * batch * tokens * width * size,
            torch.equal(got_keep, keep) and torch.equal(got_drop, drop),
        ),
        "NeighborIndex": (
            lambda: kernels.neighbor_index(x0_keep, x0_drop, 10),
            lambda: neighbor_index(x0_keep, x0_drop, 10),
            batch * tokens * width * size,
            torch.equal(got_nbr.sort(-1).values, nbr.sort(-1).values),
        ),
        "NeighborReconstruct": (
            lambda: kernels.neighbor_reconstruct(*args),
            lambda: neighbor_reconstruct(*args),
            batch * (3 * kept + 2 * (tokens - kept)) * width * size,
            torch.allclose(got_full.float(), neighbor_reconstruct(*args).float(), 1e-2, 1e-2),
        ),
    }
    return [
        {
            "shape": label,
            "op": op,
            "matches_reference": bool(same),
            "kernel_ms": _cuda_ms(kernel, runs),
            "torch_ms": _cuda_ms(reference, runs),
            "bandwidth_floor_ms": nbytes / (gbps * 1e9) * 1e3,
        }
        for op, (kernel, reference, nbytes, same) in cases.items()
    ]


def kernel_report(
    library: Path, runs: int = 20, dtype: torch.dtype = torch.float16
) -> dict[str, Any]:
    """Time and check the three kernels at ``kernel_shapes()`` on CUDA device 0."""
    if not torch.cuda.is_available():
        raise BackendUnavailableError("the kernel benchmark needs a CUDA GPU")
    kernels = CudaKernels(library)
    gbps = _copy_gbps()
    rows = [
        row
        for shape in kernel_shapes()
        for row in _rows_for_shape(kernels, shape, dtype, gbps, runs)
    ]
    return {
        "gpu": torch.cuda.get_device_name(0),
        "dtype": str(dtype).removeprefix("torch."),
        "copy_gbps": gbps,
        "runs": runs,
        "rows": rows,
    }


KERNEL_HEADERS = ["shape", "op", "= reference", "kernel ms", "torch op ms", "bandwidth floor ms"]


def kernel_table(report: dict[str, Any]) -> list[list[str]]:
    """Rows of ``KERNEL_HEADERS`` from a ``kernel_report``."""
    return [
        [
            r["shape"],
            r["op"],
            "yes" if r["matches_reference"] else "NO",
            f"{r['kernel_ms']:.3f}",
            f"{r['torch_ms']:.3f}",
            f"{r['bandwidth_floor_ms']:.3f}",
        ]
        for r in report["rows"]
    ]
