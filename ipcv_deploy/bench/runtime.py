"""End-to-end benchmark: time to first token and decode speed, dense vs IPCV vs LLM pruning.

One model is loaded once; every variant is a ``VLMPipeline`` over it (torch vision backend),
run on the same image and prompt, greedy, a fixed number of new tokens (EOS ignored), median
of ``runs`` timed runs after one warm-up. ``backend_benchmark`` sets the transformers
backend next to ONNX Runtime GenAI (``--llm-backend ort-genai``), dense and IPCV.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ipcv_deploy.compression.llm_pruning import LLMPruningConfig
from ipcv_deploy.models import LoadedModel
from ipcv_deploy.runtime import SamplingConfig, VLMPipeline
from ipcv_deploy.runtime.testcard import make_test_card

__all__ = [
    "BACKEND_HEADERS",
    "RUNTIME_HEADERS",
    "backend_benchmark",
    "backend_table",
    "runtime_benchmark",
    "runtime_table",
]

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


def backend_benchmark(
    loaded: LoadedModel,
    workdir: Path,
    runs: int = 3,
    max_new_tokens: int = 16,
    progress: Callable[[str], None] | None = None,
    package: Path | None = None,
) -> dict[str, Any]:
    """TTFT and decode speed, dense vs IPCV, transformers backend vs ONNX Runtime GenAI.

    One IPCV package is exported (``export --format ort-genai``) into ``workdir`` (or
    ``package``, one made before, is used); its dense twin shares the decoder and embedding
    and holds the dense vision export. The transformers rows run the model's tower (IPCV
    applied or not) in PyTorch on the same image at its native size.
    """
    from ipcv_deploy.artifact import load_artifact
    from ipcv_deploy.export import ExportOptions, PixelRange, export_encoder
    from ipcv_deploy.export.ort_genai import VISION_DIR, export_ort_genai
    from ipcv_deploy.runtime.ort_genai import GenaiPipeline

    image = make_test_card()
    config = loaded.adapter.reference_ipcv()
    pixels = PixelRange(*loaded.adapter.native_pixels)
    report_progress = progress or (lambda message: None)
    name = Path(loaded.name).name
    packages = {
        "dense": workdir / f"{name}-dense-ort-genai",
        "IPCV": package or workdir / f"{name}-ipcv-ort-genai",
    }
    options = ExportOptions(loaded.image_size, config, "ort", force=True, native=pixels)
    if package is None:
        report_progress(f"exporting {packages['IPCV']} ...")
        export_ort_genai(loaded, options, packages["IPCV"], report_progress)
    native = load_artifact(packages["IPCV"] / VISION_DIR).manifest.native or {}
    same_range = PixelRange(native["min_pixels"], native["max_pixels"])
    shutil.rmtree(packages["dense"], ignore_errors=True)
    shutil.copytree(packages["IPCV"], packages["dense"], ignore=shutil.ignore_patterns(VISION_DIR))
    dense_options = dataclasses.replace(options, config=None, force=False, native=same_range)
    export_encoder(loaded, dense_options, packages["dense"] / VISION_DIR, report_progress)

    def timed(name: str, answer: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        answer()  # warm-up
        stats = []
        for run in range(runs):
            report_progress(f"{name}: run {run + 1}/{runs}")
            stats.append(answer())
        return {
            "ttft_s": statistics.median(s["ttft_s"] for s in stats),
            "decode_tokens_per_s": statistics.median(s["decode_tokens_per_s"] for s in stats),
            "visual_tokens": stats[-1]["visual_tokens"],
            "runs": [s["ttft_s"] for s in stats],
        }

    rows = []
    sampling = SamplingConfig(max_new_tokens, stop_at_eos=False)
    for variant in ("dense", "IPCV"):
        pipeline = VLMPipeline.create(loaded, ipcv=config if variant == "IPCV" else None)
        row = timed(
            f"transformers {variant}",
            lambda p=pipeline: p.answer(image, PROMPT, sampling).stats,
        )
        rows.append({"backend": "transformers", "variant": variant, **row})
    for variant, path in packages.items():
        genai = GenaiPipeline(path)
        row = timed(
            f"ort-genai {variant}",
            lambda g=genai: g.answer(image, PROMPT, sampling).stats,
        )
        rows.append({"backend": "ort-genai", "variant": variant, **row})
        del genai
    base = rows[0]
    for row in rows:
        row["ttft_speedup"] = base["ttft_s"] / row["ttft_s"]
        row["decode_speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return {
        "model": loaded.name,
        "image_size": [image.height, image.width],
        "prompt": PROMPT,
        "new_tokens": max_new_tokens,
        "runs": runs,
        "rows": rows,
    }


BACKEND_HEADERS = [
    "LLM backend",
    "vision",
    "ViT tokens",
    "TTFT ms",
    "TTFT speed-up",
    "decode tok/s",
    "decode speed-up",
]


def backend_table(report: dict[str, Any]) -> list[list[str]]:
    """Rows of ``BACKEND_HEADERS`` (speed-ups against transformers dense)."""
    return [
        [
            r["backend"],
            r["variant"],
            f"{r['visual_tokens']['vit_input']} -> {r['visual_tokens']['vit_kept']}",
            f"{1000 * r['ttft_s']:.0f}",
            f"{r['ttft_speedup']:.2f}x",
            f"{r['decode_tokens_per_s']:.2f}",
            f"{r['decode_speedup']:.2f}x",
        ]
        for r in report["rows"]
    ]
