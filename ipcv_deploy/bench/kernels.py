"""The ``ipcv`` kernels against their roofline, with measured times where a CUDA GPU runs.

Per op: bytes and FLOPs, the floor per GPU, and the Triton kernel's and PyTorch op's times.

The roofline needs no GPU: each op's minimum traffic (every input read once, every output
written once) and arithmetic at the Qwen2-VL-7B ViT's shapes, and its floor
``max(bytes / bandwidth, flops / peak)`` on the GPUs users deploy on (datasheet numbers, dense
fp16 tensor-core peak, DRAM bandwidth).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ipcv_deploy.compression import gather_tokens
from ipcv_deploy.models import KERNEL_BENCHMARK_PRESET, ImageSize, load_model
from ipcv_deploy.ops import neighbor_index, neighbor_reconstruct, token_select

__all__ = [
    "GPUS",
    "KERNEL_HEADERS",
    "KERNEL_IMAGE_SIZES",
    "KERNEL_MODEL",
    "KernelShape",
    "kernel_report",
    "kernel_shapes",
    "kernel_table",
    "op_cost",
]

KERNEL_MODEL = KERNEL_BENCHMARK_PRESET
#: 448x448, about 1 MP and about 4 MP (multiples of Qwen's 28-pixel merge unit).
KERNEL_IMAGE_SIZES: tuple[ImageSize, ...] = ((448, 448), (1008, 1008), (2016, 2016))
#: name: (DRAM bytes/s, dense fp16 tensor FLOP/s), from the vendors' datasheets.
GPUS: dict[str, tuple[float, float]] = {
    "H100 SXM": (3.35e12, 989e12),
    "H200": (4.8e12, 989e12),
    "Jetson AGX Orin": (204.8e9, 42.5e12),
}
OPS = ("TokenSelect", "NeighborIndex", "NeighborReconstruct")
_INDEX_BYTES = 8


@dataclass(frozen=True)
class KernelShape:
    """The op sizes of one image: N tokens of width D, P kept, k neighbours, prefix tokens."""

    label: str
    tokens: int
    width: int
    kept: int
    neighbors: int
    prefix: int

    @property
    def dropped(self) -> int:
        """R = N - P."""
        return self.tokens - self.kept


def kernel_shapes(model: str = KERNEL_MODEL) -> list[KernelShape]:
    """``model``'s op shapes at ``KERNEL_IMAGE_SIZES`` under its reference IPCV settings."""
    loaded = load_model(model, weights=False)
    adapter = loaded.adapter(loaded.vision)
    config = loaded.adapter.reference_ipcv()
    shapes = []
    for size in KERNEL_IMAGE_SIZES:
        enc = adapter.encoder_shape(size)
        kept = config.kept_count(enc.tokens, enc.num_prefix)
        label = f"{size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.1f} MP)"
        shapes.append(
            KernelShape(label, enc.tokens, enc.width, kept, config.num_neighbors, enc.num_prefix)
        )
    return shapes


def op_cost(op: str, shape: KernelShape, element_bytes: int) -> tuple[int, int]:
    """Minimum DRAM bytes and FLOPs of ``op`` on one image of ``shape``.

    TokenSelect reads both hidden states and writes two index lists; NeighborIndex is the
    ``R x P x D`` distance GEMM (reading both token sets once, writing ``R x k`` indices);
    NeighborReconstruct reads the kept rows twice over (new and old), the pruned rows and the
    indices, and writes all N rows.
    """
    n, d, p, r, k = shape.tokens, shape.width, shape.kept, shape.dropped, shape.neighbors
    if op == "TokenSelect":
        return 2 * n * d * element_bytes + n * _INDEX_BYTES, 3 * n * d
    if op == "NeighborIndex":
        return (p + r) * d * element_bytes + r * k * _INDEX_BYTES, 2 * r * p * d + 3 * (p + r) * d
    if op == "NeighborReconstruct":
        nbytes = (2 * p + r + n) * d * element_bytes + (r * k + n) * _INDEX_BYTES
        return nbytes, r * (k + 2) * d + p * d
    raise ValueError(f"unknown op {op!r}; one of {', '.join(OPS)}")


def _floor_ms(nbytes: int, flops: int, gpu: str) -> float:
    bandwidth, peak = GPUS[gpu]
    return max(nbytes / bandwidth, flops / peak) * 1e3


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


def _measure(shape: KernelShape, dtype: torch.dtype, runs: int) -> dict[str, dict[str, Any]]:
    """Triton kernel and PyTorch op times (CUDA events) and agreement, per op, on CUDA."""
    from ipcv_deploy import kernels

    gen = torch.Generator(device="cuda").manual_seed(0)
    h_prev, h_cur = (
        torch.randn(1, shape.tokens, shape.width, generator=gen, device="cuda").to(dtype)
        for _ in range(2)
    )
    p, k = shape.kept, shape.neighbors
    keep, drop = token_select(h_prev, h_cur, p, shape.prefix)
    x0_keep, x0_drop = gather_tokens(h_cur, keep), gather_tokens(h_cur, drop)
    nbr = neighbor_index(x0_keep, x0_drop, k)
    args = (x0_keep * 1.1, x0_keep, x0_drop, nbr, keep, drop)
    got_keep, got_drop = kernels.token_select(h_prev, h_cur, p, shape.prefix)
    got_full = kernels.neighbor_reconstruct(*args).float()
    want_full = neighbor_reconstruct(*args).float()
    cases = {
        "TokenSelect": (
            lambda: kernels.token_select(h_prev, h_cur, p, shape.prefix),
            lambda: token_select(h_prev, h_cur, p, shape.prefix),
            torch.equal(got_keep, keep) and torch.equal(got_drop, drop),
        ),
        "NeighborIndex": (
            lambda: kernels.neighbor_index(x0_keep, x0_drop, k),
            lambda: neighbor_index(x0_keep, x0_drop, k),
            # fp16/bf16 distances round in another order than torch's bmm: near-ties may swap
            int((kernels.neighbor_index(x0_keep, x0_drop, k) != nbr).sum()) == 0,
        ),
        "NeighborReconstruct": (
            lambda: kernels.neighbor_reconstruct(*args),
            lambda: neighbor_reconstruct(*args),
            torch.allclose(got_full, want_full, rtol=1e-2, atol=1e-2),
        ),
    }
    return {
        op: {
            "matches_reference": bool(same),
            "kernel_ms": _cuda_ms(kernel, runs),
            "torch_ms": _cuda_ms(reference, runs),
        }
        for op, (kernel, reference, same) in cases.items()
    }


def kernel_report(
    dtype: torch.dtype = torch.float16, runs: int = 20, measure: bool | None = None
) -> dict[str, Any]:
    """Roofline rows for every op and shape; measured times too where CUDA is (``measure``).

    Returns:
        JSON-ready: the GPU (or ``None``), dtype, datasheet numbers and one row per shape and
        op with bytes, FLOPs, the floor per GPU and, when measured, kernel / torch-op ms, the
        kernel's time over the floor of the GPU it ran on when that GPU is in ``GPUS``, and
        whether the kernel matched the reference op.
    """
    measure = torch.cuda.is_available() if measure is None else measure
    gpu = torch.cuda.get_device_name(0) if measure else None
    element_bytes = torch.empty((), dtype=dtype).element_size()
    same_gpu = next((name for name in GPUS if gpu and name.split()[0] in gpu), None)
    rows = []
    for shape in kernel_shapes():
        measured = _measure(shape, dtype, runs) if measure else {}
        for op in OPS:
            nbytes, flops = op_cost(op, shape, element_bytes)
            row: dict[str, Any] = {
                "shape": shape.label,
                "tokens": shape.tokens,
                "kept": shape.kept,
                "op": op,
                "bytes": nbytes,
                "flops": flops,
                "floor_ms": {name: _floor_ms(nbytes, flops, name) for name in GPUS},
                **measured.get(op, {}),
            }
            if measured and same_gpu:
                row["kernel_over_floor"] = row["kernel_ms"] / row["floor_ms"][same_gpu]
            rows.append(row)
    return {
        "model": KERNEL_MODEL,
        "gpu": gpu,
        "dtype": str(dtype).removeprefix("torch."),
        "runs": runs if measure else 0,
        "datasheet": {name: {"bytes_per_s": b, "flops": f} for name, (b, f) in GPUS.items()},
        "rows": rows,
    }


KERNEL_HEADERS = [
    "shape",
    "op",
    "MB",
    "GFLOP",
    *(f"floor {name} ms" for name in GPUS),
    "kernel ms",
    "torch op ms",
    "= reference",
]


def kernel_table(report: dict[str, Any]) -> list[list[str]]:
    """Rows of ``KERNEL_HEADERS`` from a ``kernel_report`` (``-`` where nothing was measured)."""
    table = []
    for r in report["rows"]:
        measured = "kernel_ms" in r
        table.append(
            [
                r["shape"],
                r["op"],
                f"{r['bytes'] / 1e6:.1f}",
                f"{r['flops'] / 1e9:.2f}",
                *(f"{r['floor_ms'][name]:.4f}" for name in GPUS),
                f"{r['kernel_ms']:.4f}" if measured else "-",
                f"{r['torch_ms']:.4f}" if measured else "-",
                ("yes" if r["matches_reference"] else "NO") if measured else "-",
            ]
        )
    return table
