"""LLM-side visual-token pruning: DART, FastV, TokenCarve (``shared/specs/llm-pruning.md``).

Pure torch on one sample's tensors; the runtime (``ipcv_deploy.runtime``) gathers the inputs
inside the LLM's prefill and applies the result to the whole batch. Every selector returns
indices into the sample's image span (0 .. N-1), ascending, so kept tokens stay in their
original order and keep their original positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ipcv_deploy.errors import ConfigError, InputError

__all__ = [
    "LLM_PRUNING_METHODS",
    "LLMPruningConfig",
    "TokenCarveResult",
    "borda_points",
    "check_keep",
    "dart_select",
    "fastv_select",
    "sv_score_gram",
    "sv_score_svd",
    "tokencarve_select",
]

LLM_PRUNING_METHODS = ("dart", "fastv", "tokencarve")
#: Pivots DART takes from the image tokens and from the text after the image.
DART_PIVOTS = 4
#: TokenCarve's weight of the attention ranking in the Borda fusion.
TOKENCARVE_AV_WEIGHT = 0.5


def check_keep(keep: float) -> None:
    """Raise ``ConfigError`` unless ``keep`` is in (0, 1]."""
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"--llm-keep must be in (0, 1], got {keep}")


@dataclass(frozen=True)
class LLMPruningConfig:
    """Which method prunes image tokens in the LLM, how many it keeps, and where.

    Attributes:
        method: ``dart``, ``fastv`` or ``tokencarve``.
        keep: fraction of each image's tokens kept, in (0, 1] (DART's r is ``1 - keep``).
        layer: the LLM layer whose input is pruned (``K_llm``); the layer before it gives the
            scores. ``None``: the method's reference layer (``default_layer``).
    """

    method: str = "dart"
    keep: float = 0.35
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.method not in LLM_PRUNING_METHODS:
            raise ConfigError(
                f"unknown LLM pruning method {self.method!r}; choose one of "
                f"{', '.join(LLM_PRUNING_METHODS)}"
            )
        check_keep(self.keep)

    def default_layer(self, with_ipcv: bool) -> int:
        """The reference ``K_llm``: DART / FastV 3 after IPCV, else 2; TokenCarve 2."""
        if self.method == "tokencarve":
            return 2
        return 3 if with_ipcv else 2

    def resolve_layer(self, num_layers: int, with_ipcv: bool) -> int:
        """``layer`` or the default, checked against the LLM's depth.

        Raises:
            ConfigError: when no layer runs before it, or it is past the last layer.
        """
        layer = self.layer if self.layer is not None else self.default_layer(with_ipcv)
        if not 1 <= layer < num_layers:
            raise ConfigError(
                f"LLM pruning layer {layer} does not fit an LLM of {num_layers} layers: it must "
                f"be in [1, {num_layers - 1}]; pass --llm-layer in that range"
            )
        return layer

    def budget(self, num_image_tokens: int) -> int:
        """Image tokens kept of ``num_image_tokens`` (at least one)."""
        return max(1, int(num_image_tokens * self.keep))

    def to_dict(self) -> dict[str, object]:
        """JSON-ready settings."""
        return {"method": self.method, "keep": self.keep, "layer": self.layer}


def _ascending(index: torch.Tensor) -> torch.Tensor:
    return index.sort().values


def _top(values: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Indices of the ``k`` largest (smallest) values; equal values by index, lower first.

    ``torch.topk`` leaves the order of ties unspecified (and device dependent).
    """
    return values.sort(descending=largest, stable=True).indices[:k]


def dart_select(
    hidden: torch.Tensor,
    keys: torch.Tensor,
    image_index: torch.Tensor,
    text_index: torch.Tensor,
    keep: float,
) -> torch.Tensor:
    """DART: pivots by key L1 norm, then the tokens least similar to each pivot.

    Args:
        hidden: [L, D] hidden states of the sample at the input of ``K_llm`` (the output of
            layer ``K_llm - 1``).
        keys: [L, H * d] key vectors of layer ``K_llm - 1``, flattened over heads.
        image_index: [N] positions of the image tokens in the sequence, ascending.
        text_index: positions of the text tokens after the image span (at least 4).
        keep: ``1 - r``; each of the 8 pivots adds ``int(N * keep / 8)`` tokens.

    Returns:
        Kept indices into the image span, ascending: the 4 image pivots and the tokens chosen
        for all 8 pivots (text pivots themselves are not image tokens and are not added).

    Raises:
        InputError: fewer than 4 image tokens or fewer than 4 text tokens after the image.
    """
    n = image_index.numel()
    if n < DART_PIVOTS or text_index.numel() < DART_PIVOTS:
        raise InputError(
            f"DART needs at least {DART_PIVOTS} image tokens and {DART_PIVOTS} text tokens after "
            f"the image (got {n} and {text_index.numel()}); lengthen the prompt or use fastv"
        )
    norms = keys.float().abs().sum(-1)
    image_pivots = _top(norms[image_index], DART_PIVOTS)  # into the image span
    text_pivots = text_index[_top(norms[text_index], DART_PIVOTS)]  # sequence positions
    pivot_states = torch.cat([hidden[image_index[image_pivots]], hidden[text_pivots]]).float()
    image_states = F.normalize(hidden[image_index].float(), dim=-1)
    pivot_states = F.normalize(pivot_states, dim=-1)
    per_pivot = int(n * keep / (2 * DART_PIVOTS))
    chosen = torch.zeros(n, dtype=torch.bool, device=hidden.device)
    chosen[image_pivots] = True
    for pivot in pivot_states:
        free = (~chosen).nonzero().squeeze(1)
        take = min(per_pivot, free.numel())
        if take == 0:
            continue
        similarity = image_states[free] @ pivot
        chosen[free[_top(similarity, take, largest=False)]] = True
    return chosen.nonzero().squeeze(1)


def fastv_select(attention_row: torch.Tensor, budget: int) -> torch.Tensor:
    """FastV: the ``budget`` image tokens the last prompt token attends to most.

    Args:
        attention_row: [N] attention probabilities of the last prompt token to each image
            token (layer ``K_llm - 1``, mean over heads).
        budget: tokens to keep.

    Returns:
        Kept indices into the image span, ascending.
    """
    return _ascending(_top(attention_row.float(), budget))


def sv_score_svd(states: torch.Tensor) -> torch.Tensor:
    """TokenCarve's information score ``c_i = sum_j |U_ij| sigma_j`` from the SVD of [Nv, D]."""
    u, s, _ = torch.linalg.svd(states.float(), full_matrices=False)
    return (u.abs() * s).sum(-1)


def sv_score_gram(states: torch.Tensor) -> torch.Tensor:
    """The same score from the Gram matrix ``X X^T = Q diag(lam) Q^T`` (one symmetric eigh).

    Eigenvalues below the Gram matrix's rounding level (``n * eps * lam_max``) are the null
    space of ``X`` (``Nv > D``) and count as zero, as the SVD's missing singular values do.
    """
    x = states.float()
    lam, q = torch.linalg.eigh(x @ x.T)
    floor = lam.max().clamp_min(0) * x.shape[0] * torch.finfo(lam.dtype).eps
    return (q.abs() * torch.where(lam > floor, lam, 0).sqrt()).sum(-1)


def borda_points(score: torch.Tensor) -> torch.Tensor:
    """Rank points: the best of ``Nv`` scores earns ``Nv``, the next ``Nv - 1``, ... (stable)."""
    n = score.numel()
    order = score.argsort(descending=True, stable=True)
    points = torch.empty(n, dtype=torch.float32, device=score.device)
    points[order] = torch.arange(n, 0, -1, dtype=torch.float32, device=score.device)
    return points


@dataclass(frozen=True)
class TokenCarveResult:
    """Kept indices into the image span (ascending) and their hidden states after merging."""

    kept: torch.Tensor
    states: torch.Tensor


def tokencarve_select(
    attention_row: torch.Tensor, states: torch.Tensor, budget: int
) -> TokenCarveResult:
    """TokenCarve: Borda fusion of attention and SVD information, then stage-II merging.

    Args:
        attention_row: [Nv] last-token attention of layer 1 to the image tokens (head mean).
        states: [Nv, D] layer-1 block outputs of the image tokens.
        budget: K, the tokens kept (``floor(1.5K)`` survive stage I, the first
            ``floor(1.5K / 2)`` of them form A).

    Returns:
        Exactly ``min(K, Nv)`` kept tokens: A (each the mean of itself and the B tokens merged
        into it) and the ``K - |A|`` least-matched B tokens, in original order.
    """
    n = states.shape[0]
    budget = min(budget, n)
    fused = TOKENCARVE_AV_WEIGHT * borda_points(attention_row) + (
        1 - TOKENCARVE_AV_WEIGHT
    ) * borda_points(sv_score_gram(states))
    stage1 = fused.argsort(descending=True, stable=True)[: min(n, budget + budget // 2)]
    n_a = (3 * budget) // 4  # floor(1.5K / 2): stage I split in half, as the reference does
    group_a, group_b = stage1[:n_a], stage1[n_a:]
    kept_b_count = budget - n_a
    n_merge = group_b.numel() - kept_b_count
    out = states.clone()
    kept = group_a
    if group_b.numel():
        unit = F.normalize(states.float(), dim=-1)
        similarity, match = (unit[group_b] @ unit[group_a].T).max(-1)
        order = similarity.argsort(descending=True, stable=True)
        merged, left = order[:n_merge], order[n_merge:]
        totals = states[group_a].float().clone()
        counts = torch.ones(n_a, device=states.device)
        totals.index_add_(0, match[merged], states[group_b[merged]].float())
        counts.index_add_(0, match[merged], torch.ones(n_merge, device=states.device))
        out[group_a] = (totals / counts[:, None]).to(states.dtype)
        kept = torch.cat([group_a, group_b[left]])
    kept = _ascending(kept)
    return TokenCarveResult(kept, out[kept])
