"""IPCV on vLLM's Qwen2-VL vision tower (``vllm.model_executor.models.qwen2_vl``).

``VllmQwen2VisionAdapter`` is the ``EncoderAdapter`` of vLLM's ``Qwen2VisionTransformer``:
blocks on a token subset are vLLM's own blocks, called with the subset's ``cu_seqlens`` and
rotary tables; Attention Stabilization blocks take the kept tokens' queries over every key of
the image, with the block's weights. ``install`` replaces the tower's ``forward``: each image
(or video) of a call is encoded on its own, as ipcv-deploy's other backends do, so a
request's tokens do not depend on the requests vLLM batches with it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.model_executor.models import qwen2_vl as vllm_qwen2_vl

from ipcv_deploy.compression import EncodedInput, TokenSet, ipcv_encode, segment_attention
from ipcv_deploy.config import IPCVConfig

__all__ = ["VllmQwen2VisionAdapter", "install"]

logger = logging.getLogger("vllm.ipcv")


class _Layout:
    """An image's rotary tables (vLLM's layout: [T, rotary_dim / 2]) and subset cache.

    The last token subset's tables and offsets are kept while it runs block after block.
    """

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos, self.sin = cos, sin
        self._subset: tuple[TokenSet, tuple[Any, ...]] | None = None

    def of(self, tokens: TokenSet, tower: Any) -> tuple[Any, ...]:
        """cos, sin, ``cu_seqlens`` and ``max_seqlen`` of ``tokens`` for vLLM's blocks."""
        if self._subset is not None and self._subset[0] is tokens:
            return self._subset[1]
        index = tokens.index
        cos, sin = (
            (self.cos, self.sin) if index is None else (self.cos[index[0]], self.sin[index[0]])
        )
        sizes = torch.tensor([0, *(n for n in tokens.lengths if n)], dtype=torch.int32)
        cu = sizes.cumsum(0, dtype=torch.int32).to(self.cos.device)  # empty segments dropped
        found = (cos, sin, cu, tower.compute_attn_mask_seqlen(cu))
        self._subset = (tokens, found)
        return found


class VllmQwen2VisionAdapter:
    """vLLM's Qwen2-VL tower as IPCV sees it: one row, one segment per image / frame."""

    num_prefix_tokens = 0
    global_topk_spans_call = True

    def __init__(self, tower: Any) -> None:
        self.tower = tower

    @property
    def depth(self) -> int:
        """Number of vision blocks."""
        return len(self.tower.blocks)

    def prepare(self, config: Any, refresh: bool = False) -> None:
        """Nothing to precompute: the AS blocks split vLLM's fused qkv output as it does."""

    def embed(self, x: torch.Tensor, grid_thw: list[list[int]]) -> EncodedInput:
        """The input normalization and patch embedding of vLLM, rotary tables of the grid."""
        tower = self.tower
        x = tower.input_norm(x.to(device=tower.device), tower.dtype)
        tokens = tower.patch_embed(x)
        cos, sin = tower.rot_pos_emb(grid_thw)
        segments = tuple(h * w for t, h, w in grid_thw for _ in range(t))
        return EncodedInput(tokens.unsqueeze(0), segments, _Layout(cos, sin))

    def block(
        self, index: int, x: torch.Tensor, enc: EncodedInput, tokens: TokenSet
    ) -> torch.Tensor:
        """Block ``index`` of vLLM on the tokens of ``tokens`` (their own rotary positions)."""
        cos, sin, cu, max_seqlen = enc.context.of(tokens, self.tower)
        out = self.tower.blocks[index](
            x[0].unsqueeze(1),
            cu_seqlens=cu,
            rotary_pos_emb_cos=cos,
            rotary_pos_emb_sin=sin,
            max_seqlen=max_seqlen,
        )
        return out.squeeze(1).unsqueeze(0)

    def stabilized_block(
        self, index: int, full: torch.Tensor, enc: EncodedInput, kept: TokenSet
    ) -> torch.Tensor:
        """AS block: kept-token queries over every key / value of their image."""
        assert kept.index is not None
        blk = self.tower.blocks[index]
        attn, idx = blk.attn, kept.index[0]
        qkv, _ = attn.qkv(blk.norm1(full[0]).unsqueeze(1))
        q, k, v = (t.transpose(0, 1) for t in attn.split_qkv(qkv))  # [1, T, heads, d]
        rope: _Layout = enc.context
        q = attn.apply_rotary_emb(q[:, idx], rope.cos[idx], rope.sin[idx])
        k = attn.apply_rotary_emb(k, rope.cos, rope.sin)
        out = segment_attention(q, k, v, kept.lengths, enc.segments)
        out, _ = attn.proj(out.flatten(2).transpose(0, 1).contiguous())
        x = full[0, idx].unsqueeze(1) + out
        x = x + blk.mlp(blk.norm2(x))
        return x.squeeze(1).unsqueeze(0)

    def head(self, full: torch.Tensor, enc: EncodedInput) -> torch.Tensor:
        """The PatchMerger of vLLM on the restored tokens: [T / 4, LLM width]."""
        return self.tower.merger(full[0].unsqueeze(1))


def install(config: IPCVConfig) -> None:
    """Replace ``Qwen2VisionTransformer.forward`` by IPCV with ``config``, in this process."""
    tower_class = vllm_qwen2_vl.Qwen2VisionTransformer

    def forward(
        self: Any,
        x: torch.Tensor,
        grid_thw: torch.Tensor | list[list[int]] | None,
        *,
        encoder_metadata: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        grids = grid_thw if isinstance(grid_thw, list) else grid_thw.tolist()
        adapter = VllmQwen2VisionAdapter(self)
        outputs, start = [], 0
        for t, h, w in grids:
            count = t * h * w
            image = x[start : start + count]
            outputs.append(ipcv_encode(adapter, config, image, [[t, h, w]]).output)
            start += count
            logger.info(
                "ipcv: grid %dx%dx%d, %d tokens, %d kept from block %d",
                t,
                h,
                w,
                count,
                config.kept_count(count),
                config.prune_layer,
            )
        return torch.cat(outputs)

    forward.__doc__ = "IPCV (ipcv-deploy's vLLM plugin) in place of the dense tower forward."
    tower_class.forward = forward
    logger.info("ipcv: IPCV in vLLM's Qwen2-VL vision tower (%s)", config.to_dict())
