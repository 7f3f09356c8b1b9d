"""DART, FastV and TokenCarve selection on crafted inputs, against the spec."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ipcv_deploy.compression.llm_pruning import (
    LLMPruningConfig,
    borda_points,
    dart_select,
    fastv_select,
    sv_score_gram,
    sv_score_svd,
    tokencarve_select,
)
from ipcv_deploy.errors import ConfigError, InputError


@pytest.mark.parametrize("shape", [(40, 16), (12, 48), (24, 24)])
def test_tokencarve_gram_score_equals_svd_score(shape: tuple[int, int]) -> None:
    states = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    gram, svd = sv_score_gram(states), sv_score_svd(states)
    torch.testing.assert_close(gram, svd, rtol=1e-4, atol=1e-4)
    assert gram.argsort().tolist() == svd.argsort().tolist()


def test_borda_points_rank_descending() -> None:
    assert borda_points(torch.tensor([0.1, 0.9, 0.5, 0.7])).tolist() == [1.0, 4.0, 2.0, 3.0]


def test_fastv_keeps_the_most_attended_in_original_order() -> None:
    row = torch.tensor([0.05, 0.3, 0.01, 0.2, 0.02, 0.25, 0.17])
    assert fastv_select(row, 3).tolist() == [1, 3, 5]
    assert fastv_select(row, 7).tolist() == list(range(7))


def test_dart_pivots_and_least_similar_tokens() -> None:
    """4 image pivots (largest key L1 norm), 4 text pivots after the image; each pivot adds
    its least cosine-similar image token."""
    dim, n = 8, 16
    length = 2 + n + 6  # 2 text tokens, the image, 6 text tokens
    image = torch.arange(2, 2 + n)
    text_after = torch.arange(2 + n, length)
    eye = torch.eye(dim)
    hidden = torch.ones(length, dim)  # fillers: positive similarity to every pivot
    keys = torch.ones(length, 4)
    keys[0] = 100.0  # a loud token before the image must not become a pivot
    image_pivots = [0, 1, 2, 3]
    for i, p in enumerate(image_pivots):
        keys[image[p]] = 10.0
        hidden[image[p]] = eye[i]
    text_pivots = text_after[[0, 2, 3, 5]]
    for i, t in enumerate(text_pivots):
        keys[t] = 10.0
        hidden[t] = eye[4 + i]
    opposite = [4, 6, 7, 9, 10, 12, 13, 15]  # the image token least similar to pivot i
    for i, t in enumerate(opposite):
        hidden[image[t]] = -eye[i] + 0.1
    kept = dart_select(hidden, keys, image, text_after, keep=0.5)  # int(16 * 0.5 / 8) = 1
    assert kept.tolist() == sorted(image_pivots + opposite)


def test_dart_budget_and_refusal() -> None:
    g = torch.Generator().manual_seed(1)
    hidden, keys = torch.randn(80, 16, generator=g), torch.randn(80, 8, generator=g)
    image, text = torch.arange(4, 68), torch.arange(68, 80)
    kept = dart_select(hidden, keys, image, text, keep=0.35)
    assert kept.numel() == 4 + 8 * int(64 * 0.35 / 8)
    assert kept.tolist() == sorted(set(kept.tolist()))
    with pytest.raises(InputError, match="text tokens after the image"):
        dart_select(hidden, keys, image, torch.arange(68, 70), keep=0.35)


def _tokencarve_reference(row: torch.Tensor, states: torch.Tensor, k: int):
    """The spec, step by step, with the SVD score."""
    n = states.shape[0]

    def points(score: torch.Tensor) -> list[float]:
        order = sorted(range(n), key=lambda i: -float(score[i]))
        pts = [0.0] * n
        for rank, i in enumerate(order):
            pts[i] = float(n - rank)
        return pts

    av, sv = points(row), points(sv_score_svd(states))
    fused = [0.5 * a + 0.5 * s for a, s in zip(av, sv, strict=True)]
    stage1 = sorted(range(n), key=lambda i: -fused[i])[: int(1.5 * k)]
    half = int(1.5 * k / 2)  # the reference splits stage I in half: A = floor(1.5K / 2)
    a_set, b_set = stage1[:half], stage1[half:]
    unit = F.normalize(states, dim=-1)
    match = {b: max(a_set, key=lambda a: float(unit[b] @ unit[a])) for b in b_set}
    sim = {b: float(unit[b] @ unit[match[b]]) for b in b_set}
    merged = sorted(b_set, key=lambda b: -sim[b])[: len(b_set) - (k - len(a_set))]
    out = states.clone()
    for a in a_set:
        group = [a] + [b for b in merged if match[b] == a]
        out[a] = states[group].mean(0)
    kept = sorted(a_set + [b for b in b_set if b not in merged])
    return kept, out[kept]


@pytest.mark.parametrize(("n", "k"), [(48, 16), (36, 12), (20, 7), (30, 10), (41, 13), (64, 22)])
def test_tokencarve_matches_the_spec_reference(n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n)
    row = torch.rand(n, generator=g).softmax(0)
    states = torch.randn(n, 24, generator=g)
    result = tokencarve_select(row, states, k)
    kept, merged = _tokencarve_reference(row, states, k)
    assert result.kept.tolist() == kept
    assert result.kept.numel() == k
    torch.testing.assert_close(result.states, merged, rtol=1e-5, atol=1e-6)


def test_tokencarve_merges_duplicates_into_their_twin() -> None:
    """Six directions, each twice: stage II merges twins (similarity 1), so the K = 8 outputs
    are the directions themselves, each twin pair represented once before the leftovers."""
    base = torch.eye(6) * 3
    states = torch.cat([base, base])
    row = torch.tensor([9, 8, 7, 6, 5, 4, 3.5, 3.4, 3.3, 3.2, 3.1, 3.0]).softmax(0)
    result = tokencarve_select(row, states, 8)  # stage I 12 -> A 6 + B 6: 4 merged, 2 kept
    assert result.kept.numel() == 8
    assert result.kept.tolist() == sorted(result.kept.tolist())
    for vector in result.states:
        assert any(torch.equal(vector, b) for b in base)
    # A holds all six directions once (the twins of B have similarity 1 to them)
    assert {int(v.argmax()) for v in result.states} == set(range(6))


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match=r"--llm-keep must be in \(0, 1\]"):
        LLMPruningConfig("dart", 0.0)
    with pytest.raises(ConfigError, match=r"--llm-keep must be in \(0, 1\]"):
        LLMPruningConfig("fastv", 1.2)
    with pytest.raises(ConfigError, match="unknown LLM pruning method"):
        LLMPruningConfig("tome")
    assert LLMPruningConfig("dart").resolve_layer(28, with_ipcv=True) == 3
    assert LLMPruningConfig("fastv").resolve_layer(28, with_ipcv=False) == 2
    assert LLMPruningConfig("tokencarve").resolve_layer(28, with_ipcv=True) == 2
    with pytest.raises(ConfigError, match=r"must be in \[1, 3\]"):
        LLMPruningConfig("dart", layer=4).resolve_layer(4, with_ipcv=True)
