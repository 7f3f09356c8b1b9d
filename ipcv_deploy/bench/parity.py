"""Output agreement between two runs of an encoder (dense vs IPCV, or two backends)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["Agreement", "compare"]


@dataclass(frozen=True)
class Agreement:
    """How close ``candidate`` is to ``reference``.

    Attributes:
        max_abs: largest absolute difference.
        max_rel: ``max_abs`` over the largest reference magnitude.
        cosine: mean cosine similarity of the rows (last dimension).
    """

    max_abs: float
    max_rel: float
    cosine: float

    def to_dict(self) -> dict[str, float]:
        """Plain dict for JSON."""
        return asdict(self)


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> Agreement:
    """Compare two tensors of one shape in fp32."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    ref, cand = reference.float(), candidate.float()
    max_abs = (ref - cand).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    cosine = torch.nn.functional.cosine_similarity(ref, cand, dim=-1).mean().item()
    return Agreement(max_abs, max_abs / scale if scale else max_abs, cosine)
