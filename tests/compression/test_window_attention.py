"""Window attention forms against attention under a same-window mask (the reference)."""

import pytest
import torch
import torch.nn.functional as F

from ipcv_deploy.compression import banded_window_attention, window_attention

WINDOW = 16


def masked_reference(q, k, v, q_windows, k_windows):
    same = (q_windows.unsqueeze(-1) == k_windows.unsqueeze(-2)).unsqueeze(1)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=same
    )
    return out.transpose(1, 2)


def windows_and_kept(seed: int, rows: int = 2):
    """Windows of 1..16 tokens; each row keeps its own half (whole windows may go)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, WINDOW + 1, (9,), generator=g)
    ids = torch.repeat_interleave(torch.arange(9), sizes)
    kept = torch.stack(
        [torch.randperm(len(ids), generator=g)[: len(ids) // 2].sort().values for _ in range(rows)]
    )
    return ids.expand(rows, -1), ids[kept], g


def randn(g, rows, tokens):
    return torch.randn(rows, tokens, 2, 8, generator=g)


@pytest.mark.parametrize("seed", range(6))
def test_kept_tokens_among_themselves(seed):
    _, kept_ids, g = windows_and_kept(seed)
    q, k, v = (randn(g, 2, kept_ids.shape[1]) for _ in range(3))
    ref = masked_reference(q, k, v, kept_ids, kept_ids)
    torch.testing.assert_close(window_attention(q, k, v, kept_ids, kept_ids), ref)
    torch.testing.assert_close(banded_window_attention(q, k, v, kept_ids, WINDOW), ref)


@pytest.mark.parametrize("seed", range(3))
def test_every_token_and_kept_queries_over_all_keys(seed):
    all_ids, kept_ids, g = windows_and_kept(seed)
    q, k, v = (randn(g, 2, all_ids.shape[1]) for _ in range(3))
    ref = masked_reference(q, k, v, all_ids, all_ids)
    torch.testing.assert_close(window_attention(q, k, v, all_ids, all_ids), ref)
    torch.testing.assert_close(banded_window_attention(q, k, v, all_ids, WINDOW), ref)
    q_kept = randn(g, 2, kept_ids.shape[1])
    torch.testing.assert_close(
        window_attention(q_kept, k, v, kept_ids, all_ids),
        masked_reference(q_kept, k, v, kept_ids, all_ids),
    )


def test_windows_filling_whole_chunks_and_single_tokens():
    """Window edges on chunk edges, full windows and one-token windows side by side."""
    g = torch.Generator().manual_seed(7)
    sizes = torch.tensor([WINDOW, 1, WINDOW, WINDOW - 1, 1, 1, WINDOW])
    ids = torch.repeat_interleave(torch.arange(len(sizes)), sizes).unsqueeze(0)
    q, k, v = (randn(g, 1, ids.shape[1]) for _ in range(3))
    torch.testing.assert_close(
        banded_window_attention(q, k, v, ids, WINDOW), masked_reference(q, k, v, ids, ids)
    )
