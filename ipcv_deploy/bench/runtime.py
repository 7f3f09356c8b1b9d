"""End-to-end benchmark: time to first token and decode speed, dense vs IPCV vs LLM pruning.

One model is loaded once; every variant is a ``VLMPipeline`` over it (torch vision backend),
run on the same image and prompt, greedy, a fixed number of new tokens (EOS ignored), median
of ``runs`` timed runs after one warm-up.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from ipcv_deploy.compression.llm_pruning import LLMPruningConfig
from ipcv_deploy.models import LoadedModel
from ipcv_deploy.runtime import SamplingConfig, VLMPipeline
from ipcv_deploy.runtime.testcard import make_test_card

__all__ = ["RUNTIME_HEADERS", "runtime_benchmark", "runtime_table"]

PROMPT = "Describe the image in detail."


def _variants(keep: float) -> dict[str, tuple[bool, LLMPruningConfig | None]]:
    """Name -> (IPCV on, LLM-side pruning)."""
    return {
        "dense": (False, None),
        "IPCV": (True, None),
        "DART": (False, LLMPruningConfig("dart", keep)),
        "IPCV+DART": (True, LLMPruningConfig("dart", keep)),
        "TokenCarve": (False, LLMPruningConfig("tokencarve", keep)),
    }


def runtime_benchmark(
    loaded: LoadedModel,
    runs: int = 3,
    max_new_tokens: int = 16,
    llm_keep: float = 0.35,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Median TTFT (with its vision / prefill parts), decode tokens/s and KV size per variant."""
    image = make_test_card()
    sampling = SamplingConfig(max_new_tokens, stop_at_eos=False)
    rows = []
    for name, (ipcv, pruning) in _variants(llm_keep).items():
        pipeline = VLMPipeline.create(
            loaded, ipcv=loaded.adapter.reference_ipcv() if ipcv else None, llm_pruning=pruning
        )
        pipeline.run([image], [PROMPT], SamplingConfig(2, stop_at_eos=False))  # warm-up
        stats = []
        for run in range(runs):
            if progress:
                progress(f"{name}: run {run + 1}/{runs}")
            stats.append(pipeline.run([image], [PROMPT], sampling).stats)

        def median(key: str, stats: list[dict[str, Any]] = stats) -> float:
            return statistics.median(s[key] for s in stats)

        last = stats[-1]
        rows.append(
            {
                "variant": name,
                "ttft_s": median("ttft_s"),
                "vision_s": median("vision_s"),
                "prefill_s": median("prefill_s"),
                "decode_tokens_per_s": median("decode_tokens_per_s"),
                "visual_tokens": last["visual_tokens"],
                "kv_bytes_after_prefill": last["kv"]["bytes_after_prefill"],
                "kv_tokens_after_prefill": last["kv"]["tokens_after_prefill"],
                "ipcv": last["ipcv"],
                "llm_pruning": last["llm_pruning"],
                "runs": [s["ttft_s"] for s in stats],
            }
        )
    dense = rows[0]
    for row in rows:
        row["ttft_speedup"] = dense["ttft_s"] / row["ttft_s"]
        row["decode_speedup"] = row["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
        row["kv_ratio"] = row["kv_bytes_after_prefill"] / dense["kv_bytes_after_prefill"]
    return {
        "model": loaded.name,
        "image_size": list(pipeline.vision.image_size),
        "prompt": PROMPT,
        "new_tokens": max_new_tokens,
        "runs": runs,
        "variants": rows,
    }


RUNTIME_HEADERS = [
    "variant",
    "ViT tokens",
    "LLM image tokens",
    "TTFT ms",
    "vision ms",
    "prefill ms",
    "TTFT speed-up",
    "decode tok/s",
    "decode speed-up",
    "KV after prefill",
]


def runtime_table(report: dict[str, Any]) -> list[list[str]]:
    """Rows of ``RUNTIME_HEADERS``."""
    rows = []
    for r in report["variants"]:
        vt = r["visual_tokens"]
        rows.append(
            [
                r["variant"],
                f"{vt['vit_input']} -> {vt['vit_kept']}",
                f"{vt['llm_input']} -> {vt['llm_kept']}",
                f"{1000 * r['ttft_s']:.0f}",
                f"{1000 * r['vision_s']:.0f}",
                f"{1000 * r['prefill_s']:.0f}",
                f"{r['ttft_speedup']:.2f}x",
                f"{r['decode_tokens_per_s']:.2f}",
                f"{r['decode_speedup']:.2f}x",
                f"{r['kv_bytes_after_prefill'] / 2**20:.1f} MiB ({r['kv_ratio']:.0%})",
            ]
        )
    return rows
