"""Segment-restricted attention: rows of query segment i attend to key segment i only."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["segment_attention"]


def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_lengths: Sequence[int],
    kv_lengths: Sequence[int],
) -> torch.Tensor:
    """Scaled dot-product attention inside segments, with fused SDPA.

    Equal segments run as one batched call; unequal ones run per segment. A segment with no
    queries (an image with no kept token in ``global`` mode) is skipped.

    Args:
        q: [Tq, H, d] queries, segments of ``q_lengths`` one after another.
        k: [Tk, H, d] keys, segments of ``kv_lengths``.
        v: [Tk, H, d] values.
        q_lengths: query tokens per segment.
        kv_lengths: key/value tokens per segment (same number of segments).

    Returns:
        [Tq, H, d] attention output, dtype of ``q``.
    """
    heads, dim = q.shape[1], q.shape[2]
    if len(set(q_lengths)) == 1 and len(set(kv_lengths)) == 1:
        segments, nq, nk = len(q_lengths), q_lengths[0], kv_lengths[0]
        qb = q.view(segments, nq, heads, dim).transpose(1, 2)
        kb = k.view(segments, nk, heads, dim).transpose(1, 2)
        vb = v.view(segments, nk, heads, dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(qb, kb, vb)
        return out.transpose(1, 2).reshape(q.shape[0], heads, dim)
    outs = []
    for qs, ks, vs in zip(
        q.split(list(q_lengths)), k.split(list(kv_lengths)), v.split(list(kv_lengths)), strict=True
    ):
        if qs.shape[0] == 0:
            continue
        out = F.scaled_dot_product_attention(
            qs.transpose(0, 1).unsqueeze(0),
            ks.transpose(0, 1).unsqueeze(0),
            vs.transpose(0, 1).unsqueeze(0),
        )
        outs.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(outs, dim=0) if outs else q.new_empty(q.shape)
