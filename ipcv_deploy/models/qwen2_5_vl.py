"""Qwen2.5-VL vision tower (``Qwen2_5_VisionTransformerPretrainedModel``).

Qwen2-VL's packed patches and 2-D RoPE, plus window attention: tokens are reordered so each
112x112 window (4x4 merge units) is contiguous; most blocks attend within windows, the
``fullatt_block_indexes`` blocks over the image. RMSNorm and a gated MLP. The merger sees the
window-ordered grid and its output is put back in raster order.

IPCV keeps the window order as the token order: selection and NGR are order-free, kept tokens
attend only within their original windows (each window on its own kept tokens, however many
it keeps), and the final restore gives the merger the complete window-ordered grid.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.vision_utils import (
    get_vision_cu_seqlens,
    get_vision_position_ids,
    get_vision_window_index,
)

from ipcv_deploy.compression import (
    EncodedInput,
    TokenSet,
    banded_window_attention,
    segment_attention,
    window_attention,
)
from ipcv_deploy.compression.cost import EncoderShape
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.models.base import ImageSize, register_adapter
from ipcv_deploy.models.qwen2_vl import Qwen2VLAdapter, _Rope
from ipcv_deploy.models.qwen2_vl import tiny_config as qwen2_vl_tiny_config

__all__ = ["Qwen25VLAdapter"]


class _Windows(_Rope):
    """RoPE tables in window order, and where the windows and images lie in a row.

    ``window_ids`` (window of each token, in window order), ``order`` (merge units in window
    order, into raster order) and ``restore`` (window order -> raster order) are
    non-persistent buffers like the tables. ``windows`` (tokens per window) is known for a
    fixed grid; the native form computes the ids from the grid and leaves it ``None``.
    """

    def __init__(
        self,
        segments: tuple[Any, ...],
        cos: torch.Tensor,
        sin: torch.Tensor,
        windows: tuple[int, ...] | None,
        window_ids: torch.Tensor,
        order: torch.Tensor,
        restore: torch.Tensor,
    ) -> None:
        super().__init__(segments, cos, sin)
        self.windows = windows
        self.register_buffer("window_ids", window_ids, persistent=False)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("restore", restore, persistent=False)

    def window_of(self, index: torch.Tensor) -> torch.Tensor:
        """Window id of each token at ``index`` (any shape of in-row positions)."""
        return self.window_ids[index]


@register_adapter
class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: as Qwen2-VL, with windowed blocks that keep kept tokens in their windows."""

    family = "Qwen2.5-VL"
    model_types = ("qwen2_5_vl",)
    vision_class_names = ("Qwen2_5_VisionTransformerPretrainedModel",)
    # No reference settings were published for Qwen2.5-VL; Qwen2-VL's are used.
    reference = IPCVConfig(prune_layer=3, keep_ratio=0.35, as_layers=7, num_neighbors=10)
    full_model_class = Qwen2_5_VLForConditionalGeneration

    def encoder_shape(self, image_size: ImageSize) -> EncoderShape:
        """Blocks (gated MLP, windowed attention), patch embedding and the merger."""
        self.check_image_size(image_size)
        cfg = self.vision.config
        tokens = (image_size[0] // self._patch) * (image_size[1] // self._patch)
        d = cfg.hidden_size
        merged = d * cfg.spatial_merge_size**2
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * self._patch**2
        return EncoderShape(
            depth=self.depth,
            width=d,
            mlp_hidden=cfg.intermediate_size,
            mlp_matrices=3,
            tokens=tokens,
            num_prefix=0,
            embed_flops=2 * tokens * patch_dim * d,
            head_flops=2
            * (tokens // cfg.spatial_merge_size**2)
            * merged
            * (merged + cfg.out_hidden_size),
            window=(cfg.window_size // self._patch) ** 2,
            full_attention_blocks=tuple(cfg.fullatt_block_indexes),
        )

    def _layout(self, grid_thw: torch.Tensor, kwargs: dict[str, Any]) -> _Windows:
        vision, cfg = self.vision, self.vision.config
        position_ids = get_vision_position_ids(grid_thw, vision.spatial_merge_size, kwargs=kwargs)
        cu_seqlens = get_vision_cu_seqlens(grid_thw, kwargs=kwargs)
        order, cu_windows = get_vision_window_index(
            grid_thw, vision.spatial_merge_size, cfg.window_size, cfg.patch_size, kwargs=kwargs
        )
        order = order.to(grid_thw.device)  # transformers builds it on the CPU
        cos, sin = vision.rotary_pos_emb(vision.patch_embed.proj.weight, position_ids)
        unit = vision.spatial_merge_size**2
        windows = tuple(int(n) for n in cu_windows.diff().tolist())
        tokens = torch.arange(int(cu_windows[-1]), device=grid_thw.device)
        return _Windows(
            tuple(int(n) for n in cu_seqlens.diff().tolist()),
            self._to_window_order(cos, order, unit),
            self._to_window_order(sin, order, unit),
            windows=windows,
            window_ids=torch.bucketize(tokens, cu_windows[1:].long().to(tokens.device), right=True),
            order=order,
            restore=torch.argsort(order),
        )

    def _native_layout(self, grid_thw: torch.Tensor, tokens: Any) -> _Windows:
        """``get_vision_window_index`` of one t=1 image in closed form (no sort, no loop).

        Windows of ``s x s`` merge units go in raster order, the units of each in raster
        order; the last window row / column may be short. A unit at (row, col) in window
        (wi, wj) lands at ``wi*s*W + height(wi)*s*wj + (row % s)*width(wj) + col % s``, with
        ``W`` units per grid row, ``height`` / ``width`` the window's clipped extent.
        """
        rope = super()._native_layout(grid_thw, tokens)
        m, cfg = self.vision.spatial_merge_size, self.vision.config
        s = cfg.window_size // m // self._patch
        size = m * m
        unit = torch.arange(tokens // size, device=grid_thw.device)
        units_h, units_w = grid_thw[0, 1] // m, grid_thw[0, 2] // m
        row, col = unit // units_w, unit % units_w
        wi, wj = row // s, col // s
        height = torch.clamp(units_h - wi * s, max=s)
        width = torch.clamp(units_w - wj * s, max=s)
        restore = wi * s * units_w + height * s * wj + (row % s) * width + col % s
        window = wi * ((units_w + s - 1) // s) + wj
        order = torch.zeros_like(restore).scatter(0, restore, unit)
        window_ids = torch.zeros_like(window).scatter(0, restore, window)
        size = m * m
        return _Windows(
            rope.segments,
            self._to_window_order(rope.cos, order, size),
            self._to_window_order(rope.sin, order, size),
            windows=None,
            window_ids=window_ids.unsqueeze(-1).expand(-1, size).reshape(-1),
            order=order,
            restore=restore,
        )

    @staticmethod
    def _to_window_order(x: torch.Tensor, order: torch.Tensor, unit: int) -> torch.Tensor:
        """[..., T, C] in raster order -> window order, moving whole merge units."""
        lead = x.shape[:-2]
        units = x.reshape(*lead, -1, unit, x.shape[-1])
        return units.index_select(-3, order).reshape(x.shape)

    def embed(
        self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any
    ) -> EncodedInput:
        """Patch embedding in window order, RoPE tables, windows and one segment per image."""
        enc = super().embed(hidden_states, grid_thw, **kwargs)
        unit = self.vision.spatial_merge_size**2
        enc.tokens = self._to_window_order(enc.tokens, enc.context.order, unit)
        return enc

    def embed_native(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> EncodedInput:
        """Patch-embed one image's patches, then put them in window order."""
        enc = super().embed_native(pixels, grid_thw)
        unit = self.vision.spatial_merge_size**2
        enc.tokens = self._to_window_order(enc.tokens, enc.context.order, unit)
        return enc

    def embed_rows(self, pixels: torch.Tensor, context: Any) -> EncodedInput:
        """Patch-embed [B, h*w, C*t*p*p] and put every row in window order."""
        enc = super().embed_rows(pixels, context)
        unit = self.vision.spatial_merge_size**2
        enc.tokens = self._to_window_order(enc.tokens, enc.context.order, unit)
        return enc

    def _windowed(self, index: int) -> bool:
        return index not in self.vision.config.fullatt_block_indexes

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
        """Within images for full-attention blocks, else within windows.

        Kept tokens stay contiguous per window (window order, kept indices ascending), so
        eager runs each window on its own tokens (``window_attention``); a traced graph
        (export) runs the same attention in the form whose shapes follow the token count
        (``banded_window_attention``). Queries of an AS block (kept) are placed at their
        positions among all tokens for it, the dropped positions' outputs discarded.
        """
        if not self._windowed(index):
            return super()._attend(index, q, k, v, enc, q_tokens, k_tokens)
        windows: _Windows = enc.context
        if q_tokens.index is None and k_tokens.index is None and windows.windows is not None:
            return segment_attention(q, k, v, windows.windows, windows.windows)

        def ids(tokens: TokenSet, count: int) -> torch.Tensor:
            if tokens.index is None:
                index = torch.arange(count, device=q.device).expand(q.shape[0], -1)
                return windows.window_of(index)
            return windows.window_of(tokens.index)

        q_ids, k_ids = ids(q_tokens, q.shape[1]), ids(k_tokens, k.shape[1])
        if not torch.compiler.is_compiling():
            return window_attention(q, k, v, q_ids, k_ids)
        if q_tokens.index is None or k_tokens.index is not None:  # queries are the keys
            return banded_window_attention(q, k, v, k_ids, self._window_tokens)
        rows = q_tokens.index.unsqueeze(-1).unsqueeze(-1).expand(-1, -1, *q.shape[2:])
        placed = q.new_zeros(k.shape).scatter(1, rows, q)
        out = banded_window_attention(placed, k, v, k_ids, self._window_tokens)
        return out.gather(1, rows)

    @property
    def _window_tokens(self) -> int:
        """Tokens of a whole window (window_size / patch_size patches a side)."""
        return (self.vision.config.window_size // self._patch) ** 2

    def head(self, full: torch.Tensor, enc: EncodedInput) -> BaseModelOutputWithPooling:
        """Merger on the window-ordered grid, its output put back in raster order."""
        windows: _Windows = enc.context
        flat = full.reshape(-1, full.shape[-1])
        merged = self.vision.merger(flat).view(
            full.shape[0], -1, self.vision.config.out_hidden_size
        )
        merged = merged.index_select(1, windows.restore)
        return BaseModelOutputWithPooling(
            last_hidden_state=flat, pooler_output=merged.reshape(-1, merged.shape[-1])
        )


def tiny_config(depth: int = 12) -> Qwen2_5_VLConfig:
    """A few-block Qwen2.5-VL (windowed blocks, full blocks 5 and 11) with a 4-layer LLM."""
    return Qwen2_5_VLConfig(
        vision_config={
            "depth": depth,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_heads": 4,
            "out_hidden_size": 96,
            "window_size": 112,
            "fullatt_block_indexes": [5, depth - 1],
            "initializer_range": 0.1,
        },
        text_config=qwen2_vl_tiny_config().text_config.to_dict(),  # the same tiny LLM
        image_token_id=310,
        video_token_id=311,
        vision_start_token_id=312,
        vision_end_token_id=313,
    )
