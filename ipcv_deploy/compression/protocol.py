"""The interface IPCV needs from a vision encoder family (implemented in ``models/``).

Tokens travel as rows ``[B, T, D]``: inside a row the images (frames, tiles) are packed one
after another, each a *segment* inside which attention stays; every row has the same segment
layout. A ``TokenSet`` says which tokens a block runs on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = ["EncodedInput", "EncoderAdapter", "TokenSet"]


@dataclass(frozen=True)
class TokenSet:
    """The tokens a block sees.

    Attributes:
        lengths: tokens per segment of a row, in order; attention never crosses a segment.
        index: [B, T'] original in-row indices of these tokens (ascending), ``None`` for all.
    """

    lengths: tuple[int, ...]
    index: torch.Tensor | None = None


@dataclass
class EncodedInput:
    """The encoder input after patch embedding.

    Attributes:
        tokens: [B, T, D] hidden states entering block 0.
        segments: tokens per image / frame / tile of one row.
        context: family state the blocks and the head need (positions, grid, batch shape).
    """

    tokens: torch.Tensor
    segments: tuple[int, ...]
    context: Any


class EncoderAdapter(Protocol):
    """A vision encoder as IPCV sees it; bound to one model instance."""

    #: Leading tokens of every segment that are always kept (1 for a CLS token, else 0).
    num_prefix_tokens: int
    #: In ``global`` mode, whether the reference takes one top-k over the whole call (True)
    #: or still selects per segment and only pools neighbours over the call (False).
    global_topk_spans_call: bool

    @property
    def depth(self) -> int:
        """Number of transformer blocks."""
        ...

    def prepare(self, config: Any, refresh: bool = False) -> None:
        """Precompute what the blocks of ``config`` need from the weights.

        Kept until the adapter's ``release``; ``refresh`` recomputes what exists.
        """
        ...

    def embed(self, *args: Any, **kwargs: Any) -> EncodedInput:
        """Patch-embed the inputs of the dense ``forward`` (same arguments)."""
        ...

    def block(
        self, index: int, x: torch.Tensor, enc: EncodedInput, tokens: TokenSet
    ) -> torch.Tensor:
        """Run block ``index`` on ``x`` [B, sum(tokens.lengths), D], attention within segments."""
        ...

    def stabilized_block(
        self, index: int, full: torch.Tensor, enc: EncodedInput, kept: TokenSet
    ) -> torch.Tensor:
        """AS block: kept-token queries over all tokens of ``full`` [B, T, D].

        Returns the kept tokens [B, sum(kept.lengths), D] after attention, residual and MLP.
        """
        ...

    def head(self, full: torch.Tensor, enc: EncodedInput) -> Any:
        """Final norm / merger on the restored [B, T, D] tokens.

        With one row (the eager path) returns what the dense ``forward`` returns.
        """
        ...
