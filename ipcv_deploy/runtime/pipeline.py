"""Image + prompt -> answer: processor, vision backend, embedding stitch, LLM, streaming.

``VLMPipeline`` is the Python API behind ``ipcv-export run`` and ``eval``; it takes batches
(one image per prompt, left-padded), and reports time to first token, decode speed, the
visual tokens left after each stage and the KV-cache size.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ipcv_deploy.compression.llm_pruning import LLMPruningConfig
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.errors import ConfigError, InputError
from ipcv_deploy.hf_compat import prefill_position_ids
from ipcv_deploy.models import LoadedModel, load_model, parse_dtype, resolve_device, synchronize
from ipcv_deploy.models.processors import (
    fit_processor,
    image_rows,
    load_processor,
    native_processor,
)
from ipcv_deploy.runtime.answers import Answer, SamplingConfig, TextCallback
from ipcv_deploy.runtime.generate import (
    Generation,
    LLMInputs,
    TokenCallback,
    generate,
    language_model,
)
from ipcv_deploy.runtime.images import ImageInput, load_image
from ipcv_deploy.runtime.prompts import check_placeholders
from ipcv_deploy.runtime.vision import VisionEncoder, artifact_vision, torch_vision

__all__ = ["EncodedBatch", "ImageInput", "RunResult", "VLMPipeline", "load_image"]


@dataclass
class EncodedBatch:
    """A processed batch and its image embeddings, before they meet the LLM.

    ``batch`` is the processor's output, ``embeds`` [sum of ``tokens_per_image``, hidden] the
    vision backend's, in image order; ``timings`` holds ``preprocess_s`` and ``vision_s``.
    """

    batch: Any
    embeds: torch.Tensor
    tokens_per_image: list[int]
    timings: dict[str, float]


@dataclass
class RunResult:
    """Answers and measurements of one batch.

    ``stats`` holds seconds (``preprocess_s``, ``vision_s``, ``stitch_s``, ``prefill_s``,
    ``ttft_s``, ``decode_s``), ``decode_tokens_per_s``, ``visual_tokens`` per stage, and the
    KV cache (``kv``) after prefill and at the end, with the dense size for comparison.
    """

    answers: list[str]
    tokens: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)


class VLMPipeline:
    """A multimodal model served as vision backend + stitched LLM, with LLM-side pruning.

    Args:
        loaded: the full model (its LLM runs here; its tower only when ``vision`` is torch).
        vision: the vision backend (``torch_vision`` / ``artifact_vision``).
        processor: the model's processor (``models.processors.load_processor``).
        llm_pruning: LLM-side pruning, or ``None``.
        llm_layer: ``K_llm`` override (default: the method's reference layer).
    """

    name = "transformers"

    def __init__(
        self,
        loaded: LoadedModel,
        vision: VisionEncoder,
        processor: Any,
        llm_pruning: LLMPruningConfig | None = None,
    ) -> None:
        if loaded.model is None:
            raise ConfigError(f"{loaded.name} has no LLM; `run` needs a full multimodal model")
        self.loaded = loaded
        self.model = loaded.model
        self.vision = vision
        self.model_type = loaded.adapter.model_types[0]
        if vision.native:
            self.processor = native_processor(processor, vision.pixel_range)
        else:
            self.processor = fit_processor(processor, self.model_type, vision.image_size)
        self.llm_pruning = llm_pruning
        config = self.model.config
        self.image_token_id = int(
            getattr(config, "image_token_id", None) or config.image_token_index
        )
        self.llm_layer = None
        if llm_pruning is not None:
            depth = language_model(self.model).config.num_hidden_layers
            self.llm_layer = llm_pruning.resolve_layer(depth, vision.ipcv is not None)

    @classmethod
    def create(
        cls,
        model: str | LoadedModel,
        *,
        vision_backend: str = "torch",
        ipcv: IPCVConfig | None = None,
        artifact: Path | None = None,
        engine: Path | None = None,
        image_size: tuple[int, int] | None = None,
        llm_pruning: LLMPruningConfig | None = None,
        threads: int | None = None,
        dtype: str = "float32",
        seed: int = 0,
        device: str | None = None,
        ort_provider: str = "cpu",
        plugin_lib: Path | None = None,
    ) -> VLMPipeline:
        """Load the model and processor and set up the vision backend.

        ``vision_backend`` ``torch`` runs IPCV with ``ipcv`` (dense when ``None``) on the
        model's tower; ``ort`` / ``trt`` run ``artifact`` (whose manifest fixes the IPCV
        settings and image size).

        ``device`` (``cpu``, ``cuda``, ``auto``: CUDA when available) is where the LLM and the
        torch vision backend run: a model loaded here goes there (default ``cpu``), a
        ``LoadedModel`` passed in is moved there (``None``: left where it is). ``dtype`` is
        the parameter dtype of a model loaded here. ``ort_provider`` (``cpu``, ``cuda``,
        ``tensorrt``) and ``plugin_lib`` (the TensorRT EP's plugin library) are for
        ``vision_backend="ort"``.
        """
        if vision_backend != "ort" and ort_provider != "cpu":
            raise ConfigError(
                f"--ort-provider {ort_provider} is for --vision-backend ort, not {vision_backend}"
            )
        if isinstance(model, LoadedModel):
            loaded = model
            if device is not None and loaded.model is not None:
                loaded.model.to(resolve_device(device))
        else:
            loaded = load_model(model, parse_dtype(dtype), seed, device=device or "cpu")
        if vision_backend == "torch":
            if artifact is not None:
                raise ConfigError("--artifact is for --vision-backend ort or trt, not torch")
            vision = torch_vision(loaded, ipcv, image_size)
        else:
            if artifact is None:
                raise ConfigError(
                    f"--vision-backend {vision_backend} runs an exported encoder: pass --artifact "
                    "DIR (written by `ipcv-export export`)"
                )
            vision = artifact_vision(
                loaded, Path(artifact), vision_backend, threads, engine, ort_provider, plugin_lib
            )
        processor = load_processor(loaded, None if vision.native else vision.image_size)
        return cls(loaded, vision, processor, llm_pruning)

    @property
    def device(self) -> torch.device:
        """Where the LLM runs (and the torch vision backend); processor outputs go here."""
        return next(self.model.parameters()).device

    # --- prompt side ---------------------------------------------------------------------------
    @property
    def placeholder(self) -> str:
        """The text the processor expands into image tokens."""
        return self.processor.image_token

    def format_prompt(self, prompt: str, raw: bool = False) -> str:
        """The chat-templated prompt with one image, or ``prompt`` itself when ``raw``.

        Raises:
            InputError: a raw prompt without exactly one image placeholder, or a processor
                without a chat template.
        """
        check_placeholders(prompt, self.placeholder, raw)
        if raw:
            return prompt
        return self.chat_prompt(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        )

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        """A conversation through the chat template, ready for the assistant's turn.

        Args:
            messages: ``{"role", "content"}`` with ``content`` a string or parts
                ``{"type": "text", "text": ...}`` / ``{"type": "image"}``.

        Raises:
            InputError: the processor has no chat template.
        """
        if not getattr(self.processor, "chat_template", None):
            raise InputError(
                f"{self.loaded.name}'s processor has no chat template; pass --raw-prompt with a "
                f"prompt that contains {self.placeholder!r}"
            )
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )

    def prompt_length(self, image: ImageInput, prompt: str) -> int:
        """Tokens of one raw prompt (image placeholder expanded) as the LLM will see it.

        Raises:
            InputError: the image does not load, or the processor refuses the prompt.
        """
        return int(self._process([image], [prompt], raw_prompt=True)["input_ids"].shape[1])

    def _process(
        self, images: Sequence[ImageInput], prompts: Sequence[str], raw_prompt: bool
    ) -> Any:
        pil = [load_image(i) for i in images]
        if not self.vision.native:  # one static size; native keeps the processor's own resize
            height, width = self.vision.image_size
            pil = [i.resize((width, height), Image.Resampling.BICUBIC) for i in pil]
        texts = [self.format_prompt(p, raw_prompt) for p in prompts]
        try:
            return self.processor(text=texts, images=pil, return_tensors="pt", padding=True)
        except ValueError as err:
            raise InputError(
                f"the processor refused the prompt: {str(err).splitlines()[0]}"
            ) from None

    def encode(
        self, images: Sequence[ImageInput], prompts: Sequence[str], raw_prompt: bool = False
    ) -> EncodedBatch:
        """Process a batch and run the vision backend: the LLM's image embeddings per image."""
        if len(images) != len(prompts) or not images:
            raise InputError(
                f"one image per prompt: got {len(images)} images and {len(prompts)} prompts"
            )
        start = time.perf_counter()
        batch = self._process(images, prompts, raw_prompt)
        timings = {"preprocess_s": time.perf_counter() - start}

        start = time.perf_counter()
        if self.vision.native:
            grid = batch["image_grid_thw"]
            embeds = self.vision.backend(batch["pixel_values"], grid)["image_embeds"]
            merge = self.loaded.vision.spatial_merge_size**2
            expected = (grid.prod(-1) // merge).tolist()
        else:
            rows = image_rows(self.model_type, batch["pixel_values"], len(images))
            embeds = self.vision.backend(rows)["image_embeds"]
            expected = [embeds.shape[1]] * len(images)
        synchronize(embeds.device)
        timings["vision_s"] = time.perf_counter() - start
        return EncodedBatch(batch, embeds.reshape(-1, embeds.shape[-1]), expected, timings)

    def prepare(
        self, images: Sequence[ImageInput], prompts: Sequence[str], raw_prompt: bool = False
    ) -> tuple[LLMInputs, dict[str, float]]:
        """Process, encode and stitch a batch; returns the LLM inputs and stage timings."""
        encoded = self.encode(images, prompts, raw_prompt)
        batch, embeds, expected = encoded.batch, encoded.embeds, encoded.tokens_per_image
        timings = dict(encoded.timings)
        start = time.perf_counter()
        device = self.device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        image_mask = ids == self.image_token_id
        counts = image_mask.sum(1)
        if counts.tolist() != expected or embeds.shape[0] != sum(expected):
            raise InputError(
                f"the prompts hold {counts.tolist()} image tokens but the encoder gives "
                f"{expected}; use the model's own processor"
            )
        with torch.no_grad():
            inputs_embeds = self.model.get_input_embeddings()(ids)
            inputs_embeds[image_mask] = embeds.to(inputs_embeds)
        extra = {
            k: v.to(device) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
            if k not in ("input_ids", "attention_mask", "pixel_values")
        }
        positions = prefill_position_ids(self.model, ids, {"attention_mask": mask, **extra})
        synchronize(device)
        timings["stitch_s"] = time.perf_counter() - start
        return LLMInputs(ids, mask, inputs_embeds, positions, image_mask), timings

    def run(
        self,
        images: Sequence[ImageInput],
        prompts: Sequence[str],
        sampling: SamplingConfig | None = None,
        on_token: TokenCallback | None = None,
        raw_prompt: bool = False,
    ) -> RunResult:
        """Answer every (image, prompt) pair of the batch."""
        sampling = sampling or SamplingConfig()
        inputs, timings = self.prepare(images, prompts, raw_prompt)
        gen = generate(self.model, inputs, sampling, self.llm_pruning, self.llm_layer, on_token)
        answers = [self.decode(gen.tokens[b, : gen.lengths[b]]) for b in range(len(prompts))]
        return RunResult(answers, gen.tokens, self._stats(inputs, gen, timings))

    def answer(
        self,
        image: ImageInput,
        prompt: str,
        sampling: SamplingConfig | None = None,
        on_text: TextCallback | None = None,
        raw_prompt: bool = False,
    ) -> Answer:
        """Answer one prompt (the ``LLMBackend`` interface), streaming through ``on_text``."""
        stream = None if on_text is None else _TextStream(self, on_text)
        result = self.run([image], [prompt], sampling, on_token=stream, raw_prompt=raw_prompt)
        tokens = result.tokens[0, : result.stats["new_tokens"]].tolist()
        return Answer(result.answers[0], tokens, result.stats)

    def decode(self, tokens: torch.Tensor) -> str:
        """Text of generated token ids, special tokens dropped."""
        return self.processor.decode(tokens, skip_special_tokens=True)

    def _stats(
        self, inputs: LLMInputs, gen: Generation, timings: dict[str, float]
    ) -> dict[str, Any]:
        per_image = int(inputs.image_mask[0].sum())
        vit_input, vit_kept = self.vision.tokens_per_image, self.vision.kept_per_image
        if self.vision.native:  # the first prompt's image, at its own grid
            vit_input = per_image * self.loaded.vision.spatial_merge_size**2
            ipcv = self.vision.ipcv
            vit_kept = (
                vit_input if ipcv is None else IPCVConfig.from_dict(ipcv).kept_count(vit_input)
            )
        llm_kept = per_image if gen.pruning is None else int(gen.pruning.image_kept.shape[1])
        new_tokens = sum(gen.lengths)
        batch = len(gen.lengths)
        per_token = gen.kv_bytes // max(gen.kv_tokens, 1)
        ttft = sum(timings.values()) + gen.prefill_s
        return {
            **timings,
            "prefill_s": gen.prefill_s,
            "ttft_s": ttft,
            "decode_s": gen.decode_s,
            "new_tokens": new_tokens,
            "decode_tokens_per_s": (new_tokens - batch) / gen.decode_s if gen.decode_s else None,
            "batch": batch,
            "prompt_tokens_per_sample": inputs.attention_mask.sum(1).tolist(),
            "visual_tokens": {
                "vit_input": vit_input,
                "vit_kept": vit_kept,
                "llm_input": per_image,
                "llm_kept": llm_kept,
            },
            "kv": {
                "prompt_tokens": gen.prompt_tokens,
                "tokens_after_prefill": gen.kv_tokens,
                "bytes_after_prefill": gen.kv_bytes,
                "dense_bytes_after_prefill": per_token * gen.prompt_tokens,
                "bytes_at_end": per_token * (gen.kv_tokens + gen.tokens.shape[1] - 1),
            },
            "llm_backend": self.name,
            "vision_backend": self.vision.name,
            "ipcv": self.vision.ipcv,
            "llm_pruning": None
            if self.llm_pruning is None
            else {**self.llm_pruning.to_dict(), "layer": self.llm_layer},
        }


class _TextStream:
    """Turns sample 0's new token ids into the new text (``on_token`` -> ``on_text``)."""

    def __init__(self, pipeline: VLMPipeline, on_text: TextCallback) -> None:
        self.pipeline = pipeline
        self.on_text = on_text
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, step: int, tokens: torch.Tensor) -> None:
        self.ids.append(int(tokens[0]))
        text = self.pipeline.decode(torch.tensor(self.ids))
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.on_text(text[len(self.shown) :])
            self.shown = text
