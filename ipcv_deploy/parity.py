"""How close two tensors are: the one comparison behind demo, verify, benchmarks and tests.

``max_rel`` is the largest absolute difference over the largest reference magnitude (fp32
parity means about 1e-5); cosines are of the rows (last dimension). Computed in fp64.
"""

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
        cosine: mean cosine similarity of the rows.
        min_cosine: the lowest cosine similarity of a row.
    """

    max_abs: float
    max_rel: float
    cosine: float
    min_cosine: float

    def to_dict(self) -> dict[str, float]:
        """Plain dict for JSON."""
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"max rel err {self.max_rel:.3g} (max abs {self.max_abs:.3g}), cosine "
            f"{self.cosine:.6f} (min {self.min_cosine:.6f})"
        )


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> Agreement:
    """Compare two tensors of one shape (any float dtype; in fp64).

    Raises:
        ValueError: the shapes differ.
    """
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    if not reference.numel():
        return Agreement(0.0, 0.0, 1.0, 1.0)
    ref, cand = reference.double(), candidate.double()
    max_abs = (ref - cand).abs().max().item()
    scale = ref.abs().max().item()
    rows = torch.nn.functional.cosine_similarity(ref, cand, dim=-1)
    return Agreement(
        max_abs, max_abs / scale if scale else max_abs, rows.mean().item(), rows.min().item()
    )
