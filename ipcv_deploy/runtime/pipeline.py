"""Image + prompt -> answer: processor, vision backend, embedding stitch, LLM, streaming.

``VLMPipeline`` is the Python API behind ``ipcv-export run`` and ``eval``; it takes batches
(one image per prompt, left-padded), and reports time to first token, decode speed, the
visual tokens left after each stage and the KV-cache size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ipcv_deploy.compression.llm_pruning import LLMPruningConfig
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.errors import BackendUnavailableError, ConfigError, InputError
from ipcv_deploy.hf_compat import prefill_position_ids
from ipcv_deploy.models import LoadedModel, load_model, parse_dtype, resolve_device, synchronize
from ipcv_deploy.models.processors import (
    fit_processor,
    image_rows,
    load_processor,
    native_processor,
    tile_counts,
    tile_processor,
)
from ipcv_deploy.runtime.answers import Answer, SamplingConfig, TextCallback
from ipcv_deploy.runtime.generate import (
    Generation,
    LLMInputs,
    TokenCallback,
    generate,
    language_model,
)
from ipcv_deploy.runtime.images import (
    ImageInput,
    PromptImages,
    VideoInput,
    image_list,
    load_image,
    load_video,
)
from ipcv_deploy.runtime.prompts import check_placeholders
from ipcv_deploy.runtime.vision import VisionEncoder, artifact_vision, torch_vision

__all__ = ["EncodedBatch", "ImageInput", "RunResult", "VLMPipeline", "load_image"]


@dataclass
class EncodedBatch:
    """A processed batch and its image (and video) embeddings, before they meet the LLM.

    ``batch`` is the processor's output, ``embeds`` [sum of ``tokens_per_image``, hidden] the
    vision backend's, in image order (prompt by prompt, ``images_per_prompt`` each);
    ``timings`` holds ``preprocess_s`` and ``vision_s``.
    """

    batch: Any
    embeds: torch.Tensor
    tokens_per_image: list[int]
    images_per_prompt: list[int]
    #: Tiles per image (dynamic tiling); 1 for a native or one-size image.
    tiles_per_image: list[int]
    timings: dict[str, float]
    #: The videos' embeddings [sum of their tokens, hidden], in prompt order; ``None``: none.
    video_embeds: torch.Tensor | None = None
    #: Each prompt's video as its (t, h, w) patch grid, ``None`` for a prompt without one.
    video_grids: list[tuple[int, int, int] | None] = field(default_factory=list)

    def tokens_per_prompt(self) -> list[int]:
        """Image tokens of each prompt (all its images)."""
        counts, start = [], 0
        for n in self.images_per_prompt:
            counts.append(sum(self.tokens_per_image[start : start + n]))
            start += n
        return counts


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
        elif vision.tiles:
            self.processor = tile_processor(processor, self.model_type, vision.image_size)
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
        fixed = not (vision.native or vision.tiles)
        processor = load_processor(loaded, vision.image_size if fixed else None)
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

    def format_prompt(
        self, prompt: str, raw: bool = False, images: int = 1, videos: int = 0
    ) -> str:
        """The chat-templated prompt, its images and videos first; ``prompt`` when ``raw``.

        Raises:
            InputError: a raw prompt without one placeholder per image (and video), or a
                processor without a chat template.
        """
        check_placeholders(prompt, self.placeholder, raw, images)
        if videos:
            check_placeholders(prompt, self.processor.video_token, raw, videos)
        if raw:
            return prompt
        parts = [{"type": "image"}] * images + [{"type": "video"}] * videos
        parts.append({"type": "text", "text": prompt})
        return self.chat_prompt([{"role": "user", "content": parts}])

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        """A conversation through the chat template, ready for the assistant's turn.

        Args:
            messages: ``{"role", "content"}`` with ``content`` a string or parts
                ``{"type": "text", "text": ...}`` / ``{"type": "image"}``.

        A model without a chat template but a prompt format of its own gets that, from one user
        message.

        Raises:
            InputError: the processor has no chat template (and the model no other format
                for these messages).
        """
        if not getattr(self.processor, "chat_template", None):
            plain = self._plain_prompt(messages)
            if plain is not None:
                return plain
            raise InputError(
                f"{self.loaded.name}'s processor has no chat template; pass --raw-prompt with a "
                f"prompt that contains {self.placeholder!r}"
            )
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )

    def _plain_prompt(self, messages: list[dict[str, Any]]) -> str | None:
        """The model's own prompt of one user message, where it has one without a template."""
        if len(messages) != 1 or messages[0].get("role") != "user":
            return None
        content = messages[0].get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        text = "".join(p.get("text", "") for p in parts if p.get("type") == "text")
        images = sum(p.get("type") == "image" for p in parts)
        return self.loaded.adapter.plain_prompt(text, self.placeholder, images)

    def prompt_length(self, image: PromptImages, prompt: str) -> int:
        """Tokens of one raw prompt (image placeholder expanded) as the LLM will see it.

        Raises:
            InputError: the image does not load, or the processor refuses the prompt.
        """
        batch, _ = self._process([image_list(image)], [prompt], raw_prompt=True, videos=[None])
        return int(batch["input_ids"].shape[1])

    def _process(
        self,
        images: Sequence[list[ImageInput]],
        prompts: Sequence[str],
        raw_prompt: bool,
        videos: Sequence[list[Image.Image] | None],
    ) -> tuple[Any, list[int]]:
        """The processor's batch, and the tiles of each image (1 but for dynamic tiles)."""
        pil = [[load_image(i) for i in group] for group in images]
        adapter = self.loaded.adapter
        tiles = [1] * sum(len(g) for g in pil)
        if self.vision.tiles:
            if not adapter.anyres:  # anyres counts come with the batch
                tiles = tile_counts(self.processor, [i.size for g in pil for i in g])
        elif not self.vision.native:  # one static size; native keeps the processor's resize
            height, width = self.vision.image_size
            pil = [[i.resize((width, height), Image.Resampling.BICUBIC) for i in g] for g in pil]
        texts = [
            self.format_prompt(p, raw_prompt, len(g), int(v is not None))
            for p, g, v in zip(prompts, pil, videos, strict=True)
        ]
        if not all(pil):  # a prompt with a video only: the images in placeholder order
            flat: Any = [i for g in pil for i in g] or None
        else:
            flat = pil if any(len(g) > 1 for g in pil) else [g[0] for g in pil]
        frames = [v for v in videos if v is not None]
        extra = {"videos": frames} if frames else {}
        try:
            batch = self.processor(
                text=texts, images=flat, return_tensors="pt", padding=True, **extra
            )
        except ValueError as err:
            raise InputError(
                f"the processor refused the prompt: {str(err).splitlines()[0]}"
            ) from None
        if adapter.anyres:
            tiles = adapter.image_tiles(self.model, batch)
        return batch, tiles

    def encode(
        self,
        images: Sequence[PromptImages],
        prompts: Sequence[str],
        raw_prompt: bool = False,
        videos: Sequence[VideoInput | None] | None = None,
    ) -> EncodedBatch:
        """Process a batch and run the vision backend: the LLM's image embeddings per image.

        ``images`` holds each prompt's image, or its images in the order the prompt takes;
        ``videos`` each prompt's video (after its images), or ``None``.
        """
        videos = list(videos) if videos is not None else [None] * len(prompts)
        if len(images) != len(prompts) or len(videos) != len(prompts) or not images:
            raise InputError(
                f"one image (or list of images) per prompt: got {len(images)} for "
                f"{len(prompts)} prompts"
            )
        start = time.perf_counter()
        frames = [None if v is None else load_video(v) for v in videos]
        if any(frames):
            self._check_videos()
        pairs = zip(images, frames, strict=True)
        groups = [image_list(i, allow_none=c is not None) for i, c in pairs]
        batch, tiles = self._process(groups, prompts, raw_prompt, frames)
        timings = {"preprocess_s": time.perf_counter() - start}

        start = time.perf_counter()
        video_embeds, video_grids = None, [None] * len(prompts)
        if "pixel_values_videos" in batch:
            grid = batch["video_grid_thw"]
            outputs = self.vision.backend(batch["pixel_values_videos"], grid)
            video_embeds = outputs["image_embeds"]
            found = iter(tuple(int(n) for n in g) for g in grid.tolist())
            video_grids = [None if c is None else next(found) for c in frames]
        if self.vision.native and "pixel_values" not in batch:  # videos only
            table = self.model.get_input_embeddings()
            flat = table.weight.new_zeros((0, table.embedding_dim))
            expected = []
        elif self.vision.native:
            grid = batch["image_grid_thw"]
            embeds = self.vision.backend(batch["pixel_values"], grid)["image_embeds"]
            merge = self.loaded.vision.spatial_merge_size**2
            expected = (grid.prod(-1) // merge).tolist()
            flat = embeds.reshape(-1, embeds.shape[-1])
        else:
            rows = image_rows(self.model_type, batch["pixel_values"], tiles)
            embeds = self.vision.backend(rows)["image_embeds"]
            per_image = self.loaded.adapter.pack_image_embeds(
                self.model, list(embeds.split(tiles)), batch
            )
            expected = [e.shape[0] for e in per_image]
            flat = torch.cat(per_image)
        synchronize(flat.device)
        timings["vision_s"] = time.perf_counter() - start
        sizes = [len(g) for g in groups]
        return EncodedBatch(batch, flat, expected, sizes, tiles, timings, video_embeds, video_grids)

    def _check_videos(self) -> None:
        """Refuse videos where the encoder or the processor cannot take them.

        Raises:
            InputError: a fixed-size or exported encoder.
            BackendUnavailableError: no video processor (transformers' needs torchvision).
        """
        if not self.loaded.adapter.native_resolution:
            raise InputError(
                f"{self.loaded.adapter.family} takes no videos; videos run on the "
                "native-resolution families"
            )
        if not self.vision.native:
            raise InputError(
                f"{self.loaded.name} takes no video here: videos need a native-resolution "
                "encoder (drop --image-size)"
            )
        if self.vision.name != "torch":
            raise InputError(
                "the exported encoder takes images only (grids of one temporal patch); run "
                "videos with --vision-backend torch"
            )
        if getattr(self.processor, "video_processor", None) is None:
            raise BackendUnavailableError(
                "video input needs transformers' video processor, which needs torchvision; pip "
                f"install the torchvision release that matches torch {torch.__version__}"
            )

    def prepare(
        self, images: Sequence[PromptImages], prompts: Sequence[str], raw_prompt: bool = False
    ) -> tuple[LLMInputs, dict[str, float]]:
        """Process, encode and stitch a batch; returns the LLM inputs and stage timings."""
        return self.stitch(self.encode(images, prompts, raw_prompt))

    def stitch(self, encoded: EncodedBatch) -> tuple[LLMInputs, dict[str, float]]:
        """The image embeddings in the prompts' placeholder rows: the LLM inputs, timings."""
        batch, embeds, expected = encoded.batch, encoded.embeds, encoded.tokens_per_prompt()
        timings = dict(encoded.timings)
        start = time.perf_counter()
        device = self.device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        image_mask = ids == self.image_token_id
        _check_rows("image", image_mask, expected, embeds)
        visual_mask = image_mask
        table = self.model.get_input_embeddings()
        if int(ids.max()) >= table.num_embeddings:
            raise InputError(
                f"the prompt holds token id {int(ids.max())}, outside the LLM's vocabulary of "
                f"{table.num_embeddings}: the tokenizer knows tokens the model does not; "
                "remove them from the prompt"
            )
        with torch.no_grad():
            inputs_embeds = table(ids)
            inputs_embeds[image_mask] = embeds.to(inputs_embeds)
            if encoded.video_embeds is not None:
                video_mask = ids == self.model.config.video_token_id
                merge = self.loaded.vision.spatial_merge_size**2
                grids = encoded.video_grids
                per_prompt = [0 if g is None else math.prod(g) // merge for g in grids]
                _check_rows("video", video_mask, per_prompt, encoded.video_embeds)
                inputs_embeds[video_mask] = encoded.video_embeds.to(inputs_embeds)
                visual_mask = image_mask | video_mask
        extra = {
            k: v.to(device) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
            if k not in ("input_ids", "attention_mask", "pixel_values", "pixel_values_videos")
        }
        adapter = self.loaded.adapter
        positions = prefill_position_ids(self.model, ids, {"attention_mask": mask, **extra})
        positions = positions + adapter.position_offset
        blocks = adapter.prefix_blocks(batch)
        blocks = None if blocks is None else blocks.to(device)
        synchronize(device)
        timings["stitch_s"] = time.perf_counter() - start
        return LLMInputs(ids, mask, inputs_embeds, positions, visual_mask, blocks), timings

    def run(
        self,
        images: Sequence[PromptImages],
        prompts: Sequence[str],
        sampling: SamplingConfig | None = None,
        on_token: TokenCallback | None = None,
        raw_prompt: bool = False,
        videos: Sequence[VideoInput | None] | None = None,
    ) -> RunResult:
        """Answer every prompt about its image (or images, in order) and its video, if any."""
        sampling = sampling or SamplingConfig()
        encoded = self.encode(images, prompts, raw_prompt, videos)
        inputs, timings = self.stitch(encoded)
        gen = generate(self.model, inputs, sampling, self.llm_pruning, self.llm_layer, on_token)
        answers = [self.decode(gen.tokens[b, : gen.lengths[b]]) for b in range(len(prompts))]
        return RunResult(answers, gen.tokens, self._stats(encoded, inputs, gen, timings))

    def visual_tokens(self, encoded: EncodedBatch, prompt: int = 0) -> dict[str, int]:
        """ViT input, kept inside the IPCV blocks and LLM input of one prompt's images."""
        first = sum(encoded.images_per_prompt[:prompt])
        count = encoded.images_per_prompt[prompt]
        llm = encoded.tokens_per_image[first : first + count]
        if not self.vision.native:
            tiles = encoded.tiles_per_image[first : first + count]
            vit = [n * self.vision.tokens_per_image for n in tiles]
            kept = [n * self.vision.kept_per_image for n in tiles]
        else:  # each image at its own grid
            vit = [n * self.loaded.vision.spatial_merge_size**2 for n in llm]
            kept = [self._kept(n) for n in vit]
        grid = encoded.video_grids[prompt] if encoded.video_grids else None
        if grid is not None:  # IPCV keeps its count per frame (temporal patch)
            t, h, w = grid
            vit, kept = [*vit, t * h * w], [*kept, t * self._kept(h * w)]
            llm = [*llm, t * h * w // self.loaded.vision.spatial_merge_size**2]
        return {"vit_input": sum(vit), "vit_kept": sum(kept), "llm_input": sum(llm)}

    def _kept(self, tokens: int) -> int:
        """Tokens IPCV keeps of one image (or frame) of ``tokens`` at its own grid."""
        ipcv = self.vision.ipcv
        return tokens if ipcv is None else IPCVConfig.from_dict(ipcv).kept_count(tokens)

    def answer(
        self,
        image: PromptImages,
        prompt: str,
        sampling: SamplingConfig | None = None,
        on_text: TextCallback | None = None,
        raw_prompt: bool = False,
        video: VideoInput | None = None,
    ) -> Answer:
        """Answer one prompt about its image(s) and ``video`` (``LLMBackend``), streamed."""
        stream = None if on_text is None else _TextStream(self, on_text)
        result = self.run(
            [image], [prompt], sampling, on_token=stream, raw_prompt=raw_prompt, videos=[video]
        )
        tokens = result.tokens[0, : result.stats["new_tokens"]].tolist()
        return Answer(result.answers[0], tokens, result.stats)

    def decode(self, tokens: torch.Tensor | Sequence[int]) -> str:
        """Text of generated token ids, special tokens dropped."""
        return self.processor.decode(tokens, skip_special_tokens=True)

    def _stats(
        self,
        encoded: EncodedBatch,
        inputs: LLMInputs,
        gen: Generation,
        timings: dict[str, float],
    ) -> dict[str, Any]:
        visual = self.visual_tokens(encoded)  # the first prompt's images
        per_prompt = visual["llm_input"]
        llm_kept = per_prompt if gen.pruning is None else int(gen.pruning.image_kept.shape[1])
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
            "visual_tokens": {**visual, "llm_kept": llm_kept},
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


def _check_rows(kind: str, mask: torch.Tensor, expected: list[int], embeds: torch.Tensor) -> None:
    """Refuse embeddings that do not fill the prompts' ``kind`` placeholder rows exactly."""
    counts = mask.sum(1).tolist()
    if counts != expected or embeds.shape[0] != sum(expected):
        raise InputError(
            f"the prompts hold {counts} {kind} tokens but the encoder gives {expected}; use the "
            "model's own processor"
        )


class _TextStream:
    """Turns sample 0's new token ids into the new text (``on_token`` -> ``on_text``)."""

    def __init__(self, pipeline: VLMPipeline, on_text: TextCallback) -> None:
        self.pipeline = pipeline
        self.on_text = on_text
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, step: int, tokens: torch.Tensor) -> None:
        self.ids.append(int(tokens[0]))
        text = self.pipeline.decode(self.ids)
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.on_text(text[len(self.shown) :])
            self.shown = text
