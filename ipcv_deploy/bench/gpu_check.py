"""The prepared GPU check: one run on a machine with an NVIDIA GPU writes one JSON.

``python -m ipcv_deploy.bench.gpu_check --out gpu_check.json`` (``.ci/gpu-check`` wraps it):

1. the Triton kernels against the reference ops on the GPU (``tests/kernels`` with
   ``TRITON_INTERPRET=0``), and the plugins' C launchers with the AOT cubins against both
   (``tests/trt/test_kernels.py``);
2. the runtime on CUDA against the CPU for every tiny preset (``tests/test_devices.py``);
3. dense vs IPCV latency of the full-size Qwen2-VL-7B and InternViT-300M towers in PyTorch,
   fp16 and bf16, at 448x448 and about 1 MP (Qwen: one 1008x1008 image; InternViT: five
   448x448 tiles, as its processor tiles a 1 MP image);
4. the kernel roofline with the kernels' measured times (``bench.kernels``).

Each step's result is written as soon as it ends (the JSON is complete after any step), a
step that fails is recorded with its error and the next one runs, and steps past the time
budget are skipped and say so. Needs a CUDA GPU, PyTorch, Triton, pytest and this package's
dependencies; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ipcv_deploy.bench.report import machine_info, progress
from ipcv_deploy.errors import BackendUnavailableError
from ipcv_deploy.fileio import write_json
from ipcv_deploy.models import BENCHMARK_PRESETS, MEGAPIXEL_INPUTS, PRESETS

__all__ = ["LATENCY_CASES", "main", "run_gpu_check"]

ROOT = Path(__file__).resolve().parents[2]
#: (model, image size, images per call) for step 3: each benchmark tower at its native size
#: and at about 1 MP.
LATENCY_CASES: tuple[tuple[str, tuple[int, int], int], ...] = tuple(
    case
    for name in BENCHMARK_PRESETS
    for case in ((name, PRESETS[name].image_size, 1), (name, *MEGAPIXEL_INPUTS[name]))
)
LATENCY_DTYPES = (torch.float16, torch.bfloat16)


def _pytest(tests: list[str], junit: Path) -> dict[str, Any]:
    """Run pytest on ``tests`` in a subprocess; counts and failures from its JUnit XML.

    The Triton kernels run compiled for the GPU there, not interpreted.
    """
    # -n 0: one process, the GPU to itself (the default is several workers).
    command = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *tests]
    proc = subprocess.run(
        [*command, f"--junitxml={junit}"],
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "0"},
        capture_output=True,
        text=True,
        check=False,
    )
    suite = ET.parse(junit).getroot().find("testsuite") if junit.is_file() else None
    if suite is None:
        return {"returncode": proc.returncode, "output_tail": proc.stdout[-4000:]}
    failures = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {
        "returncode": proc.returncode,
        **{key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")},
        "failed": failures,
        "output_tail": proc.stdout[-2000:] if failures else "",
    }


def _latency() -> list[dict[str, Any]]:
    from ipcv_deploy.bench.latency import torch_latency
    from ipcv_deploy.models import load_model

    rows = []
    for dtype in LATENCY_DTYPES:
        for name, size, batch in LATENCY_CASES:
            loaded = load_model(name, dtype=dtype, device="cuda")
            config = loaded.adapter.reference_ipcv()
            rows.append(torch_latency(loaded, config, size, batch=batch, runs=10, warmup=3))
            del loaded
            torch.cuda.empty_cache()
    return rows


def _kernels() -> dict[str, Any]:
    from ipcv_deploy.bench.kernels import kernel_report

    return {
        str(dtype).removeprefix("torch."): kernel_report(dtype=dtype, runs=20)
        for dtype in (torch.float16, torch.bfloat16, torch.float32)
    }


def run_gpu_check(out: Path, budget_s: float = 420.0) -> dict[str, Any]:
    """Run the four steps, writing ``out`` after each; returns the report.

    Raises:
        BackendUnavailableError: torch sees no CUDA GPU.
    """
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "the GPU check needs a CUDA GPU (torch.cuda.is_available() is False); run it on "
            "the GPU machine"
        )
    report: dict[str, Any] = {
        "machine": {**machine_info(), "gpu": torch.cuda.get_device_name(0)},
        "torch_cuda": torch.version.cuda,
        "steps": {},
    }
    junit_dir = out.parent
    steps: list[tuple[str, Callable[[], Any]]] = [
        (
            "kernels_vs_reference",
            lambda: _pytest(["tests/kernels", "tests/trt/test_kernels.py"], junit_dir / "k.xml"),
        ),
        ("runtime_cuda_vs_cpu", lambda: _pytest(["tests/test_devices.py"], junit_dir / "dev.xml")),
        ("tower_latency", _latency),
        ("kernel_roofline", _kernels),
    ]
    start = time.monotonic()
    for name, step in steps:
        elapsed = time.monotonic() - start
        if elapsed > budget_s:
            report["steps"][name] = {"skipped": f"time budget of {budget_s:.0f} s spent"}
            continue
        progress(f"[{elapsed:5.0f} s] {name}")
        began = time.monotonic()
        try:
            result: Any = {"result": step()}
        except Exception as err:  # recorded; the next step still runs
            result = {"error": f"{type(err).__name__}: {err}"}
        result["seconds"] = round(time.monotonic() - began, 1)
        report["steps"][name] = result
        write_json(out, report)
    progress(f"[{time.monotonic() - start:5.0f} s] done: {out}")
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--out`` JSON path, ``--budget`` seconds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--budget", type=float, default=420.0, help="seconds (default 420)")
    args = parser.parse_args(argv)
    try:
        run_gpu_check(args.out, args.budget)
    except BackendUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
