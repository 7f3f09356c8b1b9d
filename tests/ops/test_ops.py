"""Each ``ipcv`` op against a plain-torch restatement of the spec, plus the op contract."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from ipcv_deploy.ops import OP_SPECS, neighbor_index, neighbor_reconstruct, token_select, torch_ops
from tests.cases import duplicated_kept_rows, large_norm_stream, tie_inputs
from tests.parity import assert_close, assert_same_indices


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ranked(values: list[float], descending: bool) -> list[int]:
    """Indices by value, equal values by index (lower first): the documented rule."""
    return sorted(range(len(values)), key=lambda i: (-values[i] if descending else values[i], i))


def _select_loop(h_prev, h_cur, num_keep, num_prefix):
    """TokenSelect restated in Python: fp64 scores, NaN as -inf, prefix forced, ties by index."""
    keeps, drops = [], []
    for prev, cur in zip(h_prev, h_cur, strict=True):
        score = torch.linalg.vector_norm(cur.double() - prev.double(), dim=-1).tolist()
        score = [float("-inf") if math.isnan(v) else v for v in score]
        score[:num_prefix] = [float("inf")] * num_prefix
        keep = sorted(_ranked(score, descending=True)[:num_keep])
        keeps.append(keep)
        drops.append([i for i in range(len(score)) if i not in set(keep)])
    return torch.tensor(keeps), torch.tensor(drops).view(len(drops), -1)


def _knn_loop(x_keep, x_drop, k):
    """NeighborIndex restated: exact fp64 distances, NaN as +inf, ties by kept index."""
    out = []
    for keep, drop in zip(x_keep.double(), x_drop.double(), strict=True):
        rows = []
        for query in drop:
            dist = ((keep - query) ** 2).sum(-1).tolist()
            dist = [float("inf") if math.isnan(v) else v for v in dist]
            rows.append(_ranked(dist, descending=False)[:k])
        out.append(rows)
    return torch.tensor(out).view(x_drop.shape[0], x_drop.shape[1], k)


@pytest.mark.parametrize(
    ("batch", "tokens", "keep", "prefix"), [(1, 50, 17, 0), (3, 65, 23, 1), (2, 9, 9, 0)]
)
def test_token_select_matches_loop(batch, tokens, keep, prefix):
    h_prev = torch.randn(batch, tokens, 16, generator=_gen())
    h_cur = torch.randn(batch, tokens, 16, generator=_gen(1))
    keep_idx, drop_idx = token_select(h_prev, h_cur, keep, prefix)
    want_keep, want_drop = _select_loop(h_prev, h_cur, keep, prefix)
    assert_same_indices(keep_idx, want_keep, "keep_idx")
    assert_same_indices(drop_idx, want_drop, "drop_idx")


@pytest.mark.parametrize(("keep", "prefix"), [(1, 0), (11, 0), (11, 1), (20, 3), (40, 1)])
def test_token_select_ties_and_nan_follow_the_rule(keep, prefix):
    h_prev, h_cur = tie_inputs()
    keep_idx, drop_idx = token_select(h_prev, h_cur, keep, prefix)
    want_keep, want_drop = _select_loop(h_prev, h_cur, keep, prefix)
    assert_same_indices(keep_idx, want_keep, "keep_idx")
    assert_same_indices(drop_idx, want_drop, "drop_idx")
    if keep < 40:
        assert 5 not in keep_idx[0].tolist()  # the NaN token is never preferred
    assert (0 in keep_idx[1].tolist()) == (prefix > 0)


def test_token_select_all_equal_scores_keep_the_first_tokens():
    h = torch.zeros(2, 30, 4)
    keep_idx, drop_idx = token_select(h, h + 1, 7, 0)
    assert keep_idx.tolist() == [list(range(7))] * 2
    assert drop_idx.tolist() == [list(range(7, 30))] * 2


def test_token_select_always_keeps_prefix_with_lowest_score():
    h_cur = torch.randn(2, 30, 8, generator=_gen())
    h_prev = h_cur + torch.randn(2, 30, 8, generator=_gen(1))
    h_prev[:, 0] = h_cur[:, 0]  # CLS unchanged: score 0, the lowest
    keep_idx, _ = token_select(h_prev, h_cur, 5, num_prefix=1)
    assert keep_idx[:, 0].tolist() == [0, 0]
    without, _ = token_select(h_prev, h_cur, 5, num_prefix=0)
    assert (without != 0).all()


def test_token_select_scores_in_fp32_for_half_inputs():
    h_prev, h_cur = large_norm_stream()
    keep_idx, drop_idx = token_select(h_prev, h_cur, 70)
    want_keep, want_drop = _select_loop(h_prev, h_cur, 70, 0)
    assert_same_indices(keep_idx, want_keep, "keep_idx")
    assert_same_indices(drop_idx, want_drop, "drop_idx")
    # The data tells fp16 scoring apart: scores kept in fp16 pick other tokens.
    half_scores = (h_cur - h_prev).float().norm(dim=-1).half()
    half_keep = half_scores.float().topk(70).indices.sort(-1).values
    assert not torch.equal(half_keep, want_keep)


def test_neighbor_index_matches_cdist():
    x_keep = torch.randn(2, 20, 12, generator=_gen())
    x_drop = torch.randn(2, 31, 12, generator=_gen(1))
    nbr = neighbor_index(x_keep, x_drop, 5)
    want = torch.cdist(x_drop.double(), x_keep.double()).argsort(dim=-1)[..., :5]
    assert_same_indices(nbr, want, "nbr")


@pytest.mark.parametrize("k", [1, 3, 12])
def test_neighbor_index_ties_and_nan_follow_the_rule(k):
    x_keep, x_drop = duplicated_kept_rows()
    nbr = neighbor_index(x_keep, x_drop, k)
    assert_same_indices(nbr, _knn_loop(x_keep, x_drop, k), "nbr")
    assert nbr[:, 0, : min(k, 3)].tolist() == [[2, 7, 9][:k]] * 2
    assert nbr[0, 4].tolist() == list(range(k))


def test_neighbor_reconstruct_matches_loop():
    b, p, r, d, k = 2, 7, 9, 6, 3
    x0_keep = torch.randn(b, p, d, generator=_gen())
    x_keep = x0_keep + torch.randn(b, p, d, generator=_gen(1))
    x0_drop = torch.randn(b, r, d, generator=_gen(2))
    nbr = torch.randint(0, p, (b, r, k), generator=_gen(3))
    perm = torch.stack([torch.randperm(p + r, generator=_gen(4 + i)) for i in range(b)])
    keep_idx = perm[:, :p].sort(-1).values
    drop_idx = perm[:, p:].sort(-1).values
    full = neighbor_reconstruct(x_keep, x0_keep, x0_drop, nbr, keep_idx, drop_idx)
    want = torch.empty(b, p + r, d)
    for i in range(b):
        for j in range(p):
            want[i, keep_idx[i, j]] = x_keep[i, j]
        for j in range(r):
            drift = sum(x_keep[i, n] - x0_keep[i, n] for n in nbr[i, j].tolist()) / k
            want[i, drop_idx[i, j]] = x0_drop[i, j] + drift
    assert_close(full, want)


def test_ngr_is_exact_without_drift():
    x0_keep = torch.randn(1, 5, 4, generator=_gen())
    x0_drop = torch.randn(1, 3, 4, generator=_gen(1))
    nbr = neighbor_index(x0_keep, x0_drop, 2)
    keep_idx, drop_idx = torch.tensor([[0, 2, 3, 5, 7]]), torch.tensor([[1, 4, 6]])
    full = neighbor_reconstruct(x0_keep, x0_keep, x0_drop, nbr, keep_idx, drop_idx)
    assert torch.equal(full[0, keep_idx[0]], x0_keep[0])
    assert torch.equal(full[0, drop_idx[0]], x0_drop[0])


@pytest.mark.parametrize("spec", OP_SPECS, ids=lambda s: s.name)
def test_contract_torch_op_matches_spec(spec):
    op = getattr(torch.ops.ipcv, spec.torch_name).default
    args = [a.name for a in op._schema.arguments]
    assert args == [t.name for t in spec.inputs] + [a.name for a in spec.attributes]
    assert len(op._schema.returns) == len(spec.outputs)
    wrapper = getattr(torch_ops, spec.torch_name)
    assert list(inspect.signature(wrapper).parameters) == args


def _sample(spec_name: str):
    g = _gen()
    if spec_name == "TokenSelect":
        return (torch.randn(2, 12, 8, generator=g), torch.randn(2, 12, 8, generator=g), 5, 1, 0, 1)
    if spec_name == "NeighborIndex":
        return (torch.randn(2, 5, 8, generator=g), torch.randn(2, 7, 8, generator=g), 3)
    keep_idx, drop_idx = token_select(*_sample("TokenSelect"))
    x0_keep, x0_drop = torch.randn(2, 5, 8, generator=g), torch.randn(2, 7, 8, generator=g)
    nbr = neighbor_index(x0_keep, x0_drop, 3)
    return (x0_keep + 1, x0_keep, x0_drop, nbr, keep_idx, drop_idx)


@pytest.mark.parametrize("spec", OP_SPECS, ids=lambda s: s.name)
def test_opcheck_fake_and_schema(spec):
    """torch's own checks: schema, fake (shape-only) kernel, autograd registration."""
    op = getattr(torch.ops.ipcv, spec.torch_name).default
    torch.library.opcheck(op, _sample(spec.name), test_utils=("test_schema", "test_faketensor"))
