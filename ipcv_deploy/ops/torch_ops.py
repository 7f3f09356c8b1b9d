"""``torch.library`` custom ops of the ``ipcv`` contract; their eager bodies are the reference.

Every other implementation (ONNX function bodies, CUDA kernels, TensorRT plugins) is tested
against these bodies. ``register_fake`` derives output shapes from attributes only, never from
data, so the ops trace and export with a static kept count.

Ranking is deterministic and the same in every implementation (``ops.specs.RANKING``): equal
values go to the lower index first; a NaN score ranks below every number (TokenSelect treats
it as -inf) and a NaN distance after every number (NeighborIndex treats it as +inf).
"""

from __future__ import annotations

import torch

__all__ = ["kept_of", "neighbor_index", "neighbor_reconstruct", "token_select"]


def kept_of(num_tokens, num_keep, num_prefix, keep_num, keep_den):
    """P of a TokenSelect: ``num_keep + (N - num_prefix) * keep_num // keep_den``.

    A fixed kept count is ``keep_num = 0``; a kept count that follows a dynamic token count N
    (native resolution) is ``num_keep = num_prefix`` and the keep ratio as ``keep_num /
    keep_den``: an integer expression of N, so TensorRT plugins state it with ``IExprBuilder``
    and SymInts trace it. Works on ints and ``torch.SymInt``.
    """
    return num_keep + (num_tokens - num_prefix) * keep_num // keep_den


@torch.library.custom_op("ipcv::token_select", mutates_args=())
def _token_select(
    h_prev: torch.Tensor,
    h_cur: torch.Tensor,
    num_keep: int,
    num_prefix: int,
    keep_num: int,
    keep_den: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_keep = kept_of(h_cur.shape[1], num_keep, num_prefix, keep_num, keep_den)
    scores = (h_cur.float() - h_prev.float()).norm(dim=-1)  # fp32 always: fp16 reorders top-k
    scores = torch.where(scores.isnan(), float("-inf"), scores)
    if num_prefix > 0:
        scores[:, :num_prefix] = float("inf")
    # A stable descending sort ranks equal scores by index, lower first.
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    keep_idx = order[:, :num_keep].sort(dim=-1).values
    drop_idx = order[:, num_keep:].sort(dim=-1).values
    return keep_idx, drop_idx


@_token_select.register_fake
def _(h_prev, h_cur, num_keep: int, num_prefix: int, keep_num: int, keep_den: int):
    batch, num_tokens = h_cur.shape[0], h_cur.shape[1]
    num_keep = kept_of(num_tokens, num_keep, num_prefix, keep_num, keep_den)
    return (
        h_cur.new_empty((batch, num_keep), dtype=torch.int64),
        h_cur.new_empty((batch, num_tokens - num_keep), dtype=torch.int64),
    )


@torch.library.custom_op("ipcv::neighbor_index", mutates_args=())
def _neighbor_index(x_keep: torch.Tensor, x_drop: torch.Tensor, num_neighbors: int) -> torch.Tensor:
    a = x_drop.float()
    b = x_keep.float()
    dist = (
        a.square().sum(-1, keepdim=True)
        + b.square().sum(-1).unsqueeze(1)
        - 2.0 * torch.bmm(a, b.transpose(1, 2))
    )  # [B, R, P] squared distances, fp32
    dist = torch.where(dist.isnan(), float("inf"), dist)
    # A stable ascending sort ranks equal distances by index, lower first.
    return dist.sort(dim=-1, stable=True).indices[..., :num_neighbors].contiguous()


@_neighbor_index.register_fake
def _(x_keep: torch.Tensor, x_drop: torch.Tensor, num_neighbors: int):
    return x_drop.new_empty((x_drop.shape[0], x_drop.shape[1], num_neighbors), dtype=torch.int64)


@torch.library.custom_op("ipcv::neighbor_reconstruct", mutates_args=())
def _neighbor_reconstruct(
    x_keep: torch.Tensor,
    x0_keep: torch.Tensor,
    x0_drop: torch.Tensor,
    nbr: torch.Tensor,
    keep_idx: torch.Tensor,
    drop_idx: torch.Tensor,
) -> torch.Tensor:
    batch, num_keep, width = x_keep.shape
    num_drop, k = nbr.shape[1], nbr.shape[2]
    delta = (x_keep.float() - x0_keep.float()).reshape(batch * num_keep, width)
    rows = (nbr + torch.arange(batch, device=nbr.device).view(batch, 1, 1) * num_keep).reshape(-1)
    delta_drop = delta.index_select(0, rows).view(batch, num_drop, k, width).mean(dim=2)
    x_drop = (x0_drop.float() + delta_drop).to(x_keep.dtype)
    full = x_keep.new_empty((batch, num_keep + num_drop, width))
    full.scatter_(1, keep_idx.unsqueeze(-1).expand(-1, -1, width), x_keep)
    full.scatter_(1, drop_idx.unsqueeze(-1).expand(-1, -1, width), x_drop)
    return full


@_neighbor_reconstruct.register_fake
def _(x_keep, x0_keep, x0_drop, nbr, keep_idx, drop_idx):
    batch, num_keep, width = x_keep.shape
    return x_keep.new_empty((batch, num_keep + x0_drop.shape[1], width))


def token_select(
    h_prev: torch.Tensor,
    h_cur: torch.Tensor,
    num_keep: int,
    num_prefix: int = 0,
    keep_num: int = 0,
    keep_den: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the tokens block K-1 changed most (spec section 1).

    Args:
        h_prev: [B, N, D] hidden states entering block K-1, any float dtype.
        h_cur: [B, N, D] hidden states entering block K.
        num_keep: P, kept per row, prefix included (num_prefix < P <= N); with ``keep_num``
            the fixed part of P (``kept_of``).
        num_prefix: leading tokens of every row always kept (InternVL's CLS).
        keep_num: with ``keep_den``, the share of the N - num_prefix other tokens kept on top
            of ``num_keep`` (0: P is ``num_keep``).
        keep_den: denominator of that share.

    Returns:
        ``keep_idx`` [B, P] and ``drop_idx`` [B, N - P], int64, each ascending. Among equal
        scores the lower index is kept; a NaN score counts as -inf (prefix tokens still kept).
    """
    return torch.ops.ipcv.token_select(h_prev, h_cur, num_keep, num_prefix, keep_num, keep_den)


def neighbor_index(x_keep: torch.Tensor, x_drop: torch.Tensor, num_neighbors: int) -> torch.Tensor:
    """The ``num_neighbors`` nearest kept tokens of each pruned token, in fp32 (spec section 2).

    Args:
        x_keep: [B, P, D] kept tokens at block K.
        x_drop: [B, R, D] pruned tokens at block K.
        num_neighbors: k, at most P.

    Returns:
        [B, R, k] int64 indices into the P kept tokens, nearest first; equal distances in
        index order (lower first); a NaN distance counts as +inf.
    """
    return torch.ops.ipcv.neighbor_index(x_keep, x_drop, num_neighbors)


def neighbor_reconstruct(
    x_keep: torch.Tensor,
    x0_keep: torch.Tensor,
    x0_drop: torch.Tensor,
    nbr: torch.Tensor,
    keep_idx: torch.Tensor,
    drop_idx: torch.Tensor,
) -> torch.Tensor:
    """Neighbour-Guided Reconstruction of every token in original order (spec section 2).

    ``x_drop = x0_drop + mean_j (x_keep - x0_keep)[nbr[:, j]]``, accumulated in fp32 and cast
    to the dtype of ``x_keep``; ``full[keep_idx] = x_keep``, ``full[drop_idx] = x_drop``.

    Args:
        x_keep: [B, P, D] kept tokens now.
        x0_keep: [B, P, D] kept tokens at block K.
        x0_drop: [B, R, D] pruned tokens at block K.
        nbr: [B, R, k] from ``neighbor_index``.
        keep_idx: [B, P] from ``token_select``.
        drop_idx: [B, R] from ``token_select``.

    Returns:
        [B, N, D] with N = P + R, dtype of ``x_keep``.
    """
    return torch.ops.ipcv.neighbor_reconstruct(x_keep, x0_keep, x0_drop, nbr, keep_idx, drop_idx)
