"""Shared inputs of the op tests (reference, ONNX function bodies, kernels): ties and NaN."""

from __future__ import annotations

import torch


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tie_inputs(batch: int = 2, tokens: int = 40, width: int = 8, seed: int = 0):
    """Integer-valued streams whose changes repeat: many exactly equal scores, NaN in places.

    Exact in every precision and summation order, so every implementation sees the same ties.
    """
    g = _gen(seed)
    h_prev = torch.randint(-4, 5, (batch, tokens, width), generator=g).float()
    steps = torch.randint(0, 3, (batch, tokens, width), generator=g).float()
    steps[:, ::3] = steps[:, 1:2]  # every third token changes exactly like token 1
    h_cur = h_prev + steps
    h_cur[0, 5, 0] = float("nan")  # a NaN score ranks below every number
    h_cur[1, 0, 2] = float("nan")  # ... but a prefix token is kept anyway
    return h_prev, h_cur


def large_norm_stream(batch: int = 2, tokens: int = 200, width: int = 64, seed: int = 0):
    """fp16 hidden states of large norm with a small update: the exact scores crowd together
    closer than fp16 resolves, so scores rounded to fp16 reorder the top-k."""
    g = _gen(seed)
    h_prev = (300 * torch.randn(batch, tokens, width, generator=g)).half()
    h_cur = (h_prev.float() + 0.6 * torch.randn(batch, tokens, width, generator=g)).half()
    return h_prev, h_cur


def duplicated_kept_rows(batch: int = 2, kept: int = 12, dropped: int = 17, width: int = 6):
    """Integer-valued kept tokens with duplicated rows (exactly equal distances), NaN in places."""
    g = _gen(5)
    x_keep = torch.randint(-3, 4, (batch, kept, width), generator=g).float()
    x_keep[:, 7] = x_keep[:, 2]
    x_keep[:, 9] = x_keep[:, 2]
    x_keep[:, 11] = x_keep[:, 4]
    x_drop = torch.randint(-3, 4, (batch, dropped, width), generator=g).float()
    x_drop[:, 0] = x_keep[:, 2]  # distance 0 to kept tokens 2, 7 and 9
    x_keep[1, 3, 1] = float("nan")  # a NaN kept token is farthest from everything
    x_drop[0, 4, 0] = float("nan")  # a NaN query: every distance NaN, so index order
    return x_keep, x_drop
