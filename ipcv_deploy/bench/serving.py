"""Load benchmark of ``ipcv-export serve`` on loopback: requests/s and time to first token.

Each variant (dense; IPCV + DART) is a real server process; a bounded load generator sends
``requests`` streamed chat completions with ``concurrency`` in flight and stops by itself.
TTFT is measured at the client: request sent -> first streamed chunk (the server starts the
stream when the request's first token exists).
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ipcv_deploy.errors import IpcvError
from ipcv_deploy.runtime.testcard import make_test_card

__all__ = [
    "SERVING_HEADERS",
    "SERVING_VARIANTS",
    "ServerProcess",
    "free_port",
    "load_test",
    "serving_benchmark",
    "serving_table",
    "wait_until_healthy",
]

#: The variants compared: name -> extra ``serve`` flags.
SERVING_VARIANTS = {"dense": ["--dense"], "ipcv+dart": ["--llm-pruning", "dart"]}


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(
    proc: subprocess.Popen, url: str, timeout_s: float, output: Callable[[], str]
) -> None:
    """Poll ``url/health`` until it answers 200.

    Raises:
        IpcvError: the process exited first (with ``output()``), or ``timeout_s`` passed (the
            process is killed).
    """
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise IpcvError(f"the server exited: {output().strip()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise IpcvError(f"the server did not answer /health within {timeout_s:.0f} s")
        time.sleep(0.2)


class ServerProcess:
    """``ipcv-export serve`` in a child process on a free loopback port."""

    def __init__(self, model: str, *extra: str, timeout_s: float = 600) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        script = Path(sys.executable).parent / "ipcv-export"
        argv = [str(script), "serve", "--model", model, "--port", str(self.port), *extra]
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        wait_until_healthy(self.proc, self.url, timeout_s, lambda: self.proc.stderr.read())

    def stop(self) -> int:
        """SIGTERM (graceful), then wait; the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=120)
        finally:
            self.proc.kill()


def _ms(seconds: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``seconds``, in ms; ``None`` for no values."""
    if not seconds:
        return None
    ordered = sorted(seconds)
    return 1e3 * ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _one(url: str, payload: dict[str, Any]) -> dict[str, Any]:
    import httpx

    start = time.perf_counter()
    first = None
    try:
        with httpx.stream("POST", url, json=payload, timeout=600) as reply:
            if reply.status_code != 200:
                return {"ok": False, "status": reply.status_code}
            for line in reply.iter_lines():
                if first is None and line.startswith("data: {"):
                    first = time.perf_counter() - start
    except httpx.HTTPError as err:
        return {"ok": False, "status": type(err).__name__}
    return {"ok": True, "ttft_s": first, "latency_s": time.perf_counter() - start}


def load_test(
    url: str, model: str, requests: int, concurrency: int, max_tokens: int
) -> dict[str, Any]:
    """``requests`` streamed completions, ``concurrency`` at a time; throughput and latency."""
    buf = io.BytesIO()
    make_test_card().save(buf, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    payload = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image}},
                    {"type": "text", "text": "Describe the image."},
                ],
            }
        ],
    }
    endpoint = f"{url}/v1/chat/completions"
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda _: _one(endpoint, payload), range(requests)))
    wall = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    latency = [r["latency_s"] for r in ok]
    return {
        "requests": requests,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "error_statuses": sorted({str(r["status"]) for r in results if not r["ok"]}),
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "ttft_ms": {
            "p50": _ms(ttft, 0.5),
            "p95": _ms(ttft, 0.95),
            "mean": 1e3 * statistics.mean(ttft) if ttft else None,
        },
        "latency_ms": {"p50": _ms(latency, 0.5), "p95": _ms(latency, 0.95)},
    }


def serving_benchmark(
    model: str,
    requests: int,
    concurrencies: Sequence[int],
    max_tokens: int,
    max_batch: int,
    progress: Callable[[str], None],
    device: str = "cpu",
) -> dict[str, Any]:
    """Every ``SERVING_VARIANTS`` server under every concurrency, one run, same machine.

    The servers run their model on ``device`` (``serve --device``).
    """
    rows = []
    for variant, flags in SERVING_VARIANTS.items():
        progress(f"{model}: starting the {variant} server ...")
        server = ServerProcess(model, *flags, "--max-batch", str(max_batch), "--device", device)
        try:
            load_test(server.url, model, 1, 1, max_tokens)  # warm-up
            for concurrency in concurrencies:
                progress(f"{model} {variant}: {requests} requests, {concurrency} in flight ...")
                result = load_test(server.url, model, requests, concurrency, max_tokens)
                rows.append({"variant": variant, **result})
        finally:
            server.stop()
    return {"model": model, "device": device, "max_batch": max_batch, "rows": rows}


SERVING_HEADERS = [
    "model",
    "variant",
    "concurrency",
    "requests",
    "errors",
    "req/s",
    "TTFT p50 ms",
    "TTFT p95 ms",
    "latency p50 ms",
]


def serving_table(report: dict[str, Any]) -> list[list[str]]:
    """Rows of ``SERVING_HEADERS``."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    return [
        [
            report["model"],
            r["variant"],
            r["concurrency"],
            r["requests"],
            r["errors"],
            f"{r['requests_per_s']:.2f}",
            ms(r["ttft_ms"]["p50"]),
            ms(r["ttft_ms"]["p95"]),
            ms(r["latency_ms"]["p50"]),
        ]
        for r in report["rows"]
    ]
