"""Shared benchmark plumbing: timing, machine facts, tables."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "format_table",
    "machine_info",
    "median_seconds",
    "peak_rss_gb",
    "progress",
]


def progress(message: str) -> None:
    """One progress line on stderr (stdout carries only the result)."""
    print(message, file=sys.stderr, flush=True)


def median_seconds(
    fn: Callable[[], object], runs: int, warmup: int = 1, label: str | None = None
) -> tuple[float, list[float]]:
    """Run ``fn`` ``warmup`` times untimed, then ``runs`` times; return the median and all times."""
    for _ in range(warmup):
        fn()
    times = []
    for i in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if label:
            progress(f"  {label} run {i + 1}/{runs}: {times[-1] * 1e3:.1f} ms")
    return statistics.median(times), times


def peak_rss_gb() -> float | None:
    """Peak resident memory of this process since it started (Linux ``VmHWM``), in GiB.

    Unlike ``ru_maxrss`` of a child, this does not inherit the parent's peak across fork/exec.
    ``None`` where ``/proc`` is not available.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """The facts a reader needs to compare numbers: CPU, cores, threads, versions."""
    import transformers

    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
