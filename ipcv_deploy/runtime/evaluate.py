"""A small VQA-style evaluation: (image, question, answer) items, dense vs compressed.

The data is a JSON Lines file (or a folder holding exactly one ``*.jsonl``), one object per
line: ``{"image": "path" | ["path", ...], "question": "...", "answer": "..." | ["...", ...]}``
(several images: in the order the question takes them), optionally ``"video": "path"`` (a
folder of frames or an animated image, after the images; ``image`` may then be left out);
paths are relative to the file. Scores: exact match and "contains" after VQA-style
normalisation (lower case, no punctuation or articles), against any of the reference answers.
"""

from __future__ import annotations

import json
import re
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipcv_deploy.errors import ConfigError, InputError
from ipcv_deploy.runtime.answers import LLMBackend, SamplingConfig
from ipcv_deploy.runtime.pipeline import VLMPipeline

__all__ = ["EvalItem", "evaluate", "load_items", "normalize_answer", "score_answer"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans(dict.fromkeys(string.punctuation, " "))


@dataclass(frozen=True)
class EvalItem:
    """One question about one image (or several, or a video), with its accepted answers."""

    #: The image, or the images of a several-image question, in order.
    image: Path | tuple[Path, ...]
    question: str
    answers: tuple[str, ...]
    #: A video after the images (frames folder or animated image), or ``None``.
    video: Path | None = None


def load_items(data: Path, limit: int | None = None) -> list[EvalItem]:
    """Read the items of a ``.jsonl`` file or of the one ``.jsonl`` in a folder.

    Raises:
        InputError: missing data, no or several ``.jsonl`` files, a malformed line.
    """
    if data.is_dir():
        found = sorted(data.glob("*.jsonl"))
        if len(found) != 1:
            raise InputError(
                f"{data} holds {len(found)} .jsonl files; it needs exactly one (or pass the file)"
            )
        data = found[0]
    if not data.is_file():
        raise InputError(f"evaluation data not found: {data}; pass a .jsonl file or its folder")
    items = []
    for number, line in enumerate(data.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            answers = record["answer"]
            answers = (answers,) if isinstance(answers, str) else tuple(map(str, answers))
            video = record.get("video")
            video = None if video is None else data.parent / video
            image = record["image"] if video is None else record.get("image", [])
            if isinstance(image, list):
                image = tuple(data.parent / i for i in image)
            else:
                image = data.parent / image
            items.append(EvalItem(image, str(record["question"]), answers, video))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InputError(
                f"{data}:{number} is not an object with image, question and answer ({err})"
            ) from None
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise InputError(f"{data} holds no items")
    return items


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def score_answer(prediction: str, answers: Sequence[str]) -> dict[str, bool]:
    """``exact``: the normalised prediction is an answer; ``contains``: it holds one."""
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers]
    return {
        "exact": pred in refs,
        "contains": any(r and re.search(rf"\b{re.escape(r)}\b", pred) for r in refs),
    }


def evaluate(
    backends: dict[str, LLMBackend],
    items: Sequence[EvalItem],
    sampling: SamplingConfig,
    batch_size: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every variant (an LLM backend) over the items; accuracy, time and agreement each.

    The first variant is the reference the others' ``agreement`` (identical answers) is
    measured against. ``batch_size`` above 1 batches prompts on the transformers backend.

    Raises:
        ConfigError: ``batch_size`` above 1, or an item with a video, for another backend.
    """
    report: dict[str, Any] = {"items": len(items), "variants": {}, "predictions": []}
    predictions: dict[str, list[str]] = {}
    videos = any(i.video is not None for i in items)
    for backend in backends.values():
        if batch_size > 1 and not isinstance(backend, VLMPipeline):
            raise ConfigError(
                f"--batch {batch_size} batches prompts on --llm-backend transformers only; "
                f"{backend.name} takes one at a time: drop --batch"
            )
        if videos and not isinstance(backend, VLMPipeline):
            raise ConfigError(
                f"items with a video run on --llm-backend transformers, not {backend.name}"
            )
    for name, backend in backends.items():
        answers: list[str] = []
        ttft, started = [], time.perf_counter()
        for first in range(0, len(items), batch_size):
            chunk = items[first : first + batch_size]
            if isinstance(backend, VLMPipeline):
                result = backend.run(
                    [i.image for i in chunk],
                    [i.question for i in chunk],
                    sampling,
                    videos=[i.video for i in chunk],
                )
                answers += result.answers
                stats = result.stats
            else:
                one = backend.answer(chunk[0].image, chunk[0].question, sampling)
                answers.append(one.answer)
                stats = one.stats
            ttft.append(stats["ttft_s"])
            if progress:
                progress(f"{name}: {len(answers)}/{len(items)}")
        predictions[name] = answers
        scores = [score_answer(a, i.answers) for a, i in zip(answers, items, strict=True)]
        report["variants"][name] = {
            "llm_backend": backend.name,
            "exact_match": sum(s["exact"] for s in scores) / len(items),
            "contains": sum(s["contains"] for s in scores) / len(items),
            "mean_ttft_s": sum(ttft) / len(ttft),
            "total_s": time.perf_counter() - started,
            "visual_tokens": stats["visual_tokens"],
            "ipcv": stats["ipcv"],
            "llm_pruning": stats["llm_pruning"],
        }
    reference = next(iter(predictions.values()))
    for name, answers in predictions.items():
        same = sum(a == r for a, r in zip(answers, reference, strict=True))
        report["variants"][name]["agreement"] = same / len(items)
    for index, item in enumerate(items):
        report["predictions"].append(
            {
                "image": str(item.image)
                if isinstance(item.image, Path)
                else [str(i) for i in item.image],
                **({} if item.video is None else {"video": str(item.video)}),
                "question": item.question,
                "answers": list(item.answers),
                **{name: predictions[name][index] for name in predictions},
            }
        )
    return report
