"""The ONNX Runtime GenAI LLM backend: an exported package answering, without torch.

``GenaiPipeline`` runs a package written by ``export --format ort-genai``: ONNX Runtime
GenAI's own image processor and tokenizer, our IPCV vision ONNX, the embedding model and the
builder's text decoder, all in ONNX Runtime. This module imports only numpy, PIL and
onnxruntime_genai (never torch or transformers), so a device needs no more than those and
onnxruntime. LLM-side pruning is the transformers backend's alone.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ipcv_deploy.artifact import GenaiPackage, load_genai_package
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.errors import ArtifactError, BackendUnavailableError, InputError
from ipcv_deploy.runtime.answers import Answer, SamplingConfig, TextCallback
from ipcv_deploy.runtime.images import ImageInput, load_image
from ipcv_deploy.runtime.prompts import check_placeholders

__all__ = ["GenaiPipeline"]


def _genai() -> Any:
    try:
        import onnxruntime_genai
    except ImportError as err:
        raise BackendUnavailableError(
            f"--llm-backend ort-genai needs onnxruntime-genai ({err}); "
            "pip install 'ipcv-deploy[genai]'"
        ) from None
    return onnxruntime_genai


class GenaiPipeline:
    """An ONNX Runtime GenAI package (``export --format ort-genai``) serving prompts.

    Args:
        path: the package directory.
        check: how its files are checked (``artifact.CHECKS``).
        expect_model: a ``--model`` the caller names; a package of another model is refused.

    Raises:
        ArtifactError: not a package, incomplete or modified, or of another model.
        BackendUnavailableError: onnxruntime-genai is not installed.
    """

    name = "ort-genai"

    def __init__(
        self, path: str | Path, check: str = "stamp", expect_model: str | None = None
    ) -> None:
        self.package: GenaiPackage = load_genai_package(path, check)
        source = self.package.source
        made_from = source.get("preset") or source.get("path")
        if expect_model is not None and expect_model not in (
            source.get("preset"),
            source.get("path"),
            Path(str(source.get("path"))).name,
        ):
            raise ArtifactError(
                f"{path} is a package of {made_from}, not {expect_model}: pass its own model "
                "or export one with `ipcv-export export --format ort-genai --model "
                f"{expect_model}`"
            )
        og = _genai()
        self._og = og
        try:
            self.model = og.Model(str(self.package.path))
        except Exception as err:  # onnxruntime_genai raises RuntimeError / OrtException
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ArtifactError(
                f"ONNX Runtime GenAI refused {path}: {first}; re-export the package"
            ) from None
        self.processor = self.model.create_multimodal_processor()
        self.tokenizer = og.Tokenizer(self.model)
        self.placeholder: str = self.package.data["image_placeholder"]
        native = self.package.vision.manifest.native or {}
        self.merge_size = int(native.get("merge_size", 2))
        self.ipcv = self.package.vision.manifest.ipcv

    def format_prompt(self, prompt: str, raw: bool = False) -> str:
        """The chat-templated prompt with one image, or ``prompt`` itself when ``raw``.

        Raises:
            InputError: a raw prompt without exactly one image placeholder, or a templated
                one that already has it.
        """
        check_placeholders(prompt, self.placeholder, raw)
        if raw:
            return prompt
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        ]
        return self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)

    def answer(
        self,
        image: ImageInput,
        prompt: str,
        sampling: SamplingConfig | None = None,
        on_text: TextCallback | None = None,
        raw_prompt: bool = False,
        return_logits: bool = False,
    ) -> Answer:
        """Answer one (image, prompt) pair; greedy when the temperature is 0.

        ``return_logits`` keeps every step's logits in ``Answer.logits``.
        """
        sampling = sampling or SamplingConfig()
        og = self._og
        start = time.perf_counter()
        buffer = io.BytesIO()
        load_image(image).save(buffer, format="PNG")
        images = og.Images.open_bytes(buffer.getvalue())
        try:
            inputs = self.processor(self.format_prompt(prompt, raw_prompt), images=images)
        except Exception as err:  # the processor raises RuntimeError on images it refuses
            raise InputError(f"ONNX Runtime GenAI's processor refused the image: {err}") from None
        grid = inputs["image_grid_thw"].as_numpy()
        prompt_tokens = int(inputs["input_ids"].as_numpy().shape[-1])
        preprocess = time.perf_counter() - start
        self._check_grid(grid)

        params = og.GeneratorParams(self.model)
        search: dict[str, Any] = {"max_length": prompt_tokens + sampling.max_new_tokens}
        if not sampling.stop_at_eos:
            search["min_length"] = search["max_length"]
        if sampling.temperature > 0:
            search.update(
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                random_seed=sampling.seed,
            )
        else:
            search.update(do_sample=False, top_k=1)
        params.set_search_options(**search)
        generator = og.Generator(self.model, params)
        generator.set_inputs(inputs)
        tokens: list[int] = []
        logits: list[np.ndarray] = []
        first = None
        stream = self.tokenizer.create_stream()
        while not generator.is_done() and len(tokens) < sampling.max_new_tokens:
            generator.generate_next_token()
            if return_logits:
                logits.append(np.asarray(generator.get_output("logits"))[0, -1].copy())
            tokens.append(int(generator.get_next_tokens()[0]))
            if first is None:
                first = time.perf_counter()
            if on_text is not None:
                on_text(stream.decode(tokens[-1]))
        end = time.perf_counter()
        first = first or end
        decode = end - first
        llm_input = int(grid.prod(-1).sum()) // self.merge_size**2
        vit_input = llm_input * self.merge_size**2
        kept = (
            vit_input
            if self.ipcv is None
            else IPCVConfig.from_dict(self.ipcv).kept_count(vit_input)
        )
        stats = {
            "preprocess_s": preprocess,
            "ttft_s": first - start,
            "decode_s": decode,
            "new_tokens": len(tokens),
            "decode_tokens_per_s": (len(tokens) - 1) / decode if decode else None,
            "prompt_tokens": prompt_tokens,
            "visual_tokens": {
                "vit_input": vit_input,
                "vit_kept": kept,
                "llm_input": llm_input,
                "llm_kept": llm_input,
            },
            "llm_backend": self.name,
            "ipcv": self.ipcv,
            "llm_pruning": None,
        }
        return Answer(self.decode(tokens), tokens, stats, logits)

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of generated token ids."""
        return self.tokenizer.decode(np.asarray(tokens, np.int32))

    def _check_grid(self, grid: np.ndarray) -> None:
        """The processor's grid against the vision artifact's range (one line naming it)."""
        native = self.package.vision.manifest.native
        if native is None:
            return
        for t, h, w in grid.tolist():
            if not native["min_tokens"] <= t * h * w <= native["max_tokens"]:
                raise InputError(
                    f"the image gives {h}x{w} patches ({t * h * w}), outside the package's "
                    f"{native['min_tokens']}..{native['max_tokens']} patches "
                    f"({native['min_pixels']}..{native['max_pixels']} px); resize the image or "
                    "re-export with --min-pixels / --max-pixels"
                )
