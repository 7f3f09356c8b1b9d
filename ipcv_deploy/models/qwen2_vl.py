"""Qwen2-VL vision tower (``Qwen2VisionTransformerPretrainedModel``).

Packed patches with 2-D RoPE, one attention segment per image / frame, 2x2 PatchMerger after
the last block.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

from ipcv_deploy.compression import EncodedInput, TokenSet, gather_tokens, segment_attention
from ipcv_deploy.compression.cost import EncoderShape
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.errors import InputError
from ipcv_deploy.models.base import (
    FamilyAdapter,
    ImageSize,
    check_multiple,
    register_adapter,
    reject_layer_outputs,
)

__all__ = ["MAX_PATCHES", "Qwen2VLAdapter"]

#: Buffers ``Qwen2VLAdapter.prepare`` adds to an AS block's attention: q and k/v, split.
_SPLIT = ("ipcv_q_weight", "ipcv_q_bias", "ipcv_kv_weight", "ipcv_kv_bias")

#: Patches of the largest image the Qwen2-VL processor makes (its default max_pixels 12845056
#: at 14 px patches); bigger static sizes are refused up front.
MAX_PATCHES = 65536


class _Rope(nn.Module):
    """Segments and RoPE tables of a row's tokens; the kept tokens' tables once gathered.

    The tables are non-persistent buffers, so ``.to(device)`` of a module holding the row
    context (``RowEncoder``) moves them with the weights; they are never saved.
    """

    def __init__(self, segments: tuple[int, ...], cos: torch.Tensor, sin: torch.Tensor) -> None:
        super().__init__()
        self.segments = segments
        self.register_buffer("cos", cos, persistent=False)  # [T, head_dim], same for every row
        self.register_buffer("sin", sin, persistent=False)
        self._kept: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def of(self, index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of the tokens at ``index`` [B, T'] (all tokens, [T, d], for ``None``)."""
        if index is None:
            return self.cos, self.sin
        if self._kept is None or self._kept[0] is not index:
            self._kept = (index, self.cos[index], self.sin[index])
        return self._kept[1], self._kept[2]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """2-D vision RoPE on [B, T, H, d], in fp32 like ``apply_rotary_pos_emb_vision``."""
    xf = x.float()
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


@register_adapter
class Qwen2VLAdapter(FamilyAdapter):
    """Qwen2-VL: the reference takes one top-k over every patch of the call in ``global`` mode."""

    family = "Qwen2-VL"
    model_types = ("qwen2_vl",)
    vision_class_names = ("Qwen2VisionTransformerPretrainedModel",)
    num_prefix_tokens = 0
    global_topk_spans_call = True
    native_resolution = True
    # Qwen2VLImageProcessor's defaults: 56x56 .. 3584x3584 pixels.
    native_pixels = (56 * 56, 28 * 28 * 16384)
    head_is_projector = True
    reference = IPCVConfig(prune_layer=3, keep_ratio=0.35, as_layers=7, num_neighbors=10)
    full_model_class = Qwen2VLForConditionalGeneration
    tower_attribute = "visual"

    @property
    def depth(self) -> int:
        """Number of vision blocks."""
        return len(self.vision.blocks)

    @property
    def _patch(self) -> int:
        return int(self.vision.config.patch_size)

    def check_image_size(self, image_size: ImageSize) -> None:
        """Sides multiples of patch x merge (28 for the released models), <= MAX_PATCHES.

        Checked before anything is allocated, so an absurd size fails at once.
        """
        check_multiple(image_size, self._patch * self.vision.spatial_merge_size, self.family)
        patches = (image_size[0] // self._patch) * (image_size[1] // self._patch)
        if patches > MAX_PATCHES:
            raise InputError(
                f"image size {image_size[0]}x{image_size[1]} gives {patches} patches per image, "
                f"more than the {MAX_PATCHES} of the processor's largest image (max_pixels "
                f"{MAX_PATCHES * self._patch**2}); pass a smaller --image-size, e.g. 448x448"
            )

    def example_inputs(
        self, image_size: ImageSize, batch: int, generator: torch.Generator
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Flattened patches ``[B*h*w, C*t*p*p]`` and ``grid_thw`` [B, 3] as the processor gives."""
        self.check_image_size(image_size)
        cfg = self.vision.config
        h, w = image_size[0] // self._patch, image_size[1] // self._patch
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * self._patch**2
        pixels = self._random((batch * h * w, patch_dim), generator)
        grid = torch.tensor([[1, h, w]] * batch, dtype=torch.long, device=self.device)
        return (pixels,), {"grid_thw": grid}

    def encoder_shape(self, image_size: ImageSize) -> EncoderShape:
        """Blocks, patch embedding and the 2x2 merger at ``image_size``."""
        self.check_image_size(image_size)
        cfg = self.vision.config
        tokens = (image_size[0] // self._patch) * (image_size[1] // self._patch)
        d = cfg.embed_dim
        merged = d * cfg.spatial_merge_size**2
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * self._patch**2
        groups = tokens // cfg.spatial_merge_size**2
        return EncoderShape(
            depth=self.depth,
            width=d,
            mlp_hidden=int(d * cfg.mlp_ratio),
            mlp_matrices=2,
            tokens=tokens,
            num_prefix=0,
            embed_flops=2 * tokens * patch_dim * d,
            head_flops=2 * groups * merged * (merged + cfg.hidden_size),
        )

    def features(self, output: BaseModelOutputWithPooling) -> torch.Tensor:
        """The merger output [tokens / 4, hidden_size] that replaces the image placeholders."""
        return output.pooler_output

    def embed(
        self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any
    ) -> EncodedInput:
        """Patch embedding, 2-D RoPE tables and one segment per image / frame, in one row."""
        reject_layer_outputs(kwargs, self.depth)
        if grid_thw.ndim != 2 or grid_thw.shape[-1] != 3:
            raise InputError(
                f"grid_thw must be [num_images, 3] (t, h, w), got {tuple(grid_thw.shape)}"
            )
        expected = int(grid_thw.prod(-1).sum())
        if hidden_states.ndim != 2 or hidden_states.shape[0] != expected:
            raise InputError(
                f"pixel patches {tuple(hidden_states.shape)} do not match grid_thw "
                f"{grid_thw.tolist()} (expected {expected} rows); pass the processor's "
                "pixel_values together with its image_grid_thw"
            )
        rope = self._layout(grid_thw, kwargs)
        tokens = self.vision.patch_embed(hidden_states)
        return EncodedInput(tokens.unsqueeze(0), rope.segments, rope)

    def _layout(self, grid_thw: torch.Tensor, kwargs: dict[str, Any]) -> _Rope:
        vision = self.vision
        position_ids = get_vision_position_ids(grid_thw, vision.spatial_merge_size, kwargs=kwargs)
        cu_seqlens = get_vision_cu_seqlens(grid_thw, kwargs=kwargs)
        cos, sin = vision.rotary_pos_emb(vision.patch_embed.proj.weight, position_ids)
        return _Rope(tuple(int(n) for n in cu_seqlens.diff().tolist()), cos, sin)

    # The native form (what a native-resolution export traces): one image per call at any
    # grid, ``pixel_values [h*w, C*t*p*p]`` + ``image_grid_thw [1, 3]`` as the processor makes
    # them; positions come from the grid as tensor arithmetic, so the graph has no
    # data-dependent shape and the token count is its one dynamic dimension.
    def native_inputs(
        self, grid: tuple[int, int], generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded ``pixel_values`` [h*w, C*t*p*p] and ``image_grid_thw`` [[1, h, w]]."""
        h, w = grid
        (pixels,), kwargs = self.example_inputs((h * self._patch, w * self._patch), 1, generator)
        return pixels, kwargs["grid_thw"]

    def embed_native(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> EncodedInput:
        """Patch-embed one image's patches [N, C*t*p*p]; RoPE tables from ``grid_thw`` [1, 3]."""
        layout = self._native_layout(grid_thw, pixels.shape[0])
        tokens = self.vision.patch_embed(pixels)
        return EncodedInput(tokens.unsqueeze(0), layout.segments, layout)

    def _native_layout(self, grid_thw: torch.Tensor, tokens: Any) -> _Rope:
        """``get_vision_position_ids`` of one t=1 image, as arithmetic on the token index."""
        m = self.vision.spatial_merge_size
        index = torch.arange(tokens, device=grid_thw.device)
        unit, place = index // (m * m), index % (m * m)
        units_w = grid_thw[0, 2] // m
        row, col = unit // units_w, unit % units_w
        position_ids = torch.stack([row * m + place // m, col * m + place % m], dim=-1)
        cos, sin = self.vision.rotary_pos_emb(self.vision.patch_embed.proj.weight, position_ids)
        return _Rope((tokens,), cos, sin)

    def row_context(self, image_size: ImageSize) -> _Rope:
        """Segments and RoPE tables of one image of ``image_size``, computed once per export.

        Made on the tower's device; a module (buffers), so it follows later ``.to()`` calls.
        """
        self.check_image_size(image_size)
        h, w = image_size[0] // self._patch, image_size[1] // self._patch
        return self._layout(torch.tensor([[1, h, w]], device=self.device), {})

    def row_inputs(
        self, image_size: ImageSize, batch: int, generator: torch.Generator
    ) -> torch.Tensor:
        """Flattened patches of one image per row, [B, h*w, C*t*p*p]."""
        (pixels,), _ = self.example_inputs(image_size, batch, generator)
        return pixels.view(batch, -1, pixels.shape[-1])

    def embed_rows(self, pixels: torch.Tensor, context: Any) -> EncodedInput:
        """Patch-embed [B, h*w, C*t*p*p], one image per row, with ``row_context``'s tables."""
        rope: _Rope = context
        tokens = self.vision.patch_embed(pixels.reshape(-1, pixels.shape[-1]))
        return EncodedInput(tokens.view(pixels.shape[0], pixels.shape[1], -1), rope.segments, rope)

    def block(
        self, index: int, x: torch.Tensor, enc: EncodedInput, tokens: TokenSet
    ) -> torch.Tensor:
        """``Qwen2VLVisionBlock`` on a token subset: RoPE of the tokens' original positions."""
        blk = self.vision.blocks[index]
        rope: _Rope = enc.context
        cos, sin = rope.of(tokens.index)
        q, k, v = blk.attn.qkv(blk.norm1(x)).unflatten(-1, (3, blk.attn.num_heads, -1)).unbind(2)
        out = self._attend(
            index, _rotate(q, cos, sin), _rotate(k, cos, sin), v, enc, tokens, tokens
        )
        x = x + blk.attn.proj(out.flatten(2))
        return x + blk.mlp(blk.norm2(x))

    def stabilized_block(
        self, index: int, full: torch.Tensor, enc: EncodedInput, kept: TokenSet
    ) -> torch.Tensor:
        """Kept-token queries over all keys/values of each image (spec section 3)."""
        assert kept.index is not None
        blk = self.vision.blocks[index]
        rope: _Rope = enc.context
        attn, idx = blk.attn, kept.index
        assert hasattr(attn, _SPLIT[0]), f"AS block {index}: call adapter.prepare(config) first"
        h = blk.norm1(full)
        q = F.linear(gather_tokens(h, idx), attn.ipcv_q_weight, attn.ipcv_q_bias)
        q = q.unflatten(-1, (attn.num_heads, -1))
        kv = F.linear(h, attn.ipcv_kv_weight, attn.ipcv_kv_bias)
        k, v = kv.unflatten(-1, (2, attn.num_heads, -1)).unbind(2)
        q, k = _rotate(q, *rope.of(idx)), _rotate(k, rope.cos, rope.sin)
        out = self._attend(index, q, k, v, enc, kept, TokenSet(enc.segments))
        x = gather_tokens(full, idx) + blk.attn.proj(out.flatten(2))
        return x + blk.mlp(blk.norm2(x))

    def prepare(self, config: IPCVConfig, refresh: bool = False) -> None:
        """Split the fused qkv of every AS block into q and k/v copies (buffers on the block).

        With them an export holds plain weight initializers for both projections, no
        run-time Slice of a fused weight, so quantizers and TensorRT see ordinary weight
        MatMuls. The copies are non-persistent buffers (never saved; they follow ``.to()``),
        made when IPCV is applied (``refresh``); ``release`` drops them.
        """
        for index in range(config.prune_layer, min(config.as_end, self.depth)):
            attn = self.vision.blocks[index].attn
            if not refresh and hasattr(attn, _SPLIT[0]):
                continue
            width = attn.qkv.weight.shape[1]
            with torch.no_grad():
                parts = (
                    attn.qkv.weight[:width],
                    attn.qkv.bias[:width],
                    attn.qkv.weight[width:],
                    attn.qkv.bias[width:],
                )
                for name, part in zip(_SPLIT, parts, strict=True):
                    attn.register_buffer(name, part.clone(), persistent=False)

    def release(self) -> None:
        """Drop the buffers ``prepare`` made."""
        for block in self.vision.blocks:
            for name in _SPLIT:
                if hasattr(block.attn, name):
                    delattr(block.attn, name)

    def _attend(
        self,
        index: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        enc: EncodedInput,
        q_tokens: TokenSet,
        k_tokens: TokenSet,
    ) -> torch.Tensor:
        """Attention of block ``index``: every block attends within images / frames."""
        return segment_attention(q, k, v, q_tokens.lengths, k_tokens.lengths)

    def head(self, full: torch.Tensor, enc: EncodedInput) -> BaseModelOutputWithPooling:
        """PatchMerger on the restored grid; rows are flattened as the dense tower packs them."""
        flat = full.reshape(-1, full.shape[-1])
        return BaseModelOutputWithPooling(
            last_hidden_state=flat, pooler_output=self.vision.merger(flat)
        )


#: Image / video token ids of the presets' tokenizer (``models.processors``).
_TINY_TOKENIZER_IMAGE_IDS = {
    "image_token_id": 310,
    "video_token_id": 311,
    "vision_start_token_id": 312,
    "vision_end_token_id": 313,
}


_TINY_TOKENIZER_BOS_EOS = {"bos_token_id": 1, "eos_token_id": 2}


def _mrope(theta: float, section: list[int]) -> dict[str, object]:
    return {"rope_type": "default", "rope_theta": theta, "mrope_section": section}


def tiny_config(depth: int = 12, width: int = 64, mlp_ratio: int = 2) -> Qwen2VLConfig:
    """A few-block Qwen2-VL with a 4-layer LLM for tests (vocab 320)."""
    return Qwen2VLConfig(
        vision_config={
            "depth": depth,
            "embed_dim": width,
            "hidden_size": 96,
            "num_heads": 4,
            "mlp_ratio": mlp_ratio,
            "initializer_range": 0.1,
        },
        text_config={
            "vocab_size": 320,
            "hidden_size": 96,
            "intermediate_size": 192,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            **_TINY_TOKENIZER_BOS_EOS,
            "rope_parameters": _mrope(10000.0, [4, 4, 4]),
        },
        **_TINY_TOKENIZER_IMAGE_IDS,
    )


def small_config() -> Qwen2VLConfig:
    """The default model of ``demo`` / ``run``: a 24-block, 256-wide ViT and the tiny LLM.

    Big enough that IPCV's saving, not per-op overhead, decides the time on a CPU (at
    448x448 about 0.65 s dense on 2 cores), small enough for a demo of seconds.
    """
    return tiny_config(depth=24, width=256, mlp_ratio=4)


def benchmark_2b_config() -> Qwen2VLConfig:
    """Qwen2-VL-2B's shapes (675M ViT, 1.5B LLM) with the tiny tokenizer's special-token ids."""
    return Qwen2VLConfig(
        vision_config={"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16},
        text_config={
            "vocab_size": 151936,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            **_TINY_TOKENIZER_BOS_EOS,
            "rope_parameters": _mrope(1000000.0, [16, 24, 24]),
        },
        **_TINY_TOKENIZER_IMAGE_IDS,
        tie_word_embeddings=True,
    )
