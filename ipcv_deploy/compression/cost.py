"""Analytic FLOPs of a ViT, dense and with IPCV (spec section 8).

One multiply-add counts as 2 FLOPs. Norms, activations, softmax and RoPE are left out (they
are a few percent of the matmuls and shrink with the same token count).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from ipcv_deploy.config import IPCVConfig

__all__ = ["AttentionForm", "EncoderShape", "FlopBreakdown", "WindowRun", "encoder_flops"]

AttentionForm = Literal["kept_query", "full_query"]
#: How windowed blocks run: ``eager`` each window on its own tokens; ``graph`` an export of
#: one image size (dense windows static, pruned ones banded); ``native_graph`` a
#: native-resolution export (every windowed block banded). See ``compression.attention``.
WindowRun = Literal["eager", "graph", "native_graph"]


@dataclass(frozen=True)
class EncoderShape:
    """What the FLOP count needs to know of an encoder at one image size.

    Attributes:
        depth: L, transformer blocks.
        width: D, hidden size.
        mlp_hidden: MLP inner size.
        mlp_matrices: weight matrices of the MLP (2 for fc1/fc2, 3 for a gated MLP).
        tokens: N, tokens per image (CLS included).
        num_prefix: tokens always kept (CLS).
        embed_flops: patch embedding FLOPs per image.
        head_flops: merger / final projection FLOPs per image (inside the vision module).
        window: tokens per attention window in windowed blocks (``None``: every block attends
            over the whole image).
        full_attention_blocks: with ``window``, the blocks that still attend over the image.
    """

    depth: int
    width: int
    mlp_hidden: int
    mlp_matrices: int
    tokens: int
    num_prefix: int
    embed_flops: int
    head_flops: int
    window: int | None = None
    full_attention_blocks: tuple[int, ...] = ()

    def pairs(
        self, index: int, queries: int, keys: int, pruned: bool, run: WindowRun = "eager"
    ) -> int:
        """Query-key pairs block ``index`` scores, for ``queries`` over ``keys`` per image.

        Windowed blocks attend within windows of ``window`` tokens. Eager, each window runs
        on its own tokens (pruned: its kept share, taken as uniform). A graph runs a window
        whose tokens are not fixed at export (pruned, or any in a native-resolution graph)
        banded: each of the keys' tokens scores 3 x ``window`` keys.
        """
        if self.window is None or index in self.full_attention_blocks:
            return queries * keys
        banded = run == "native_graph" or (run == "graph" and pruned)
        if banded:
            return keys * 3 * self.window
        return queries * self.window * keys // self.tokens


@dataclass(frozen=True)
class FlopBreakdown:
    """FLOPs per image, by part."""

    embed: int
    linear: int
    attention: int
    ipcv_ops: int
    head: int

    @property
    def blocks(self) -> int:
        """FLOPs of the transformer blocks (linear + attention)."""
        return self.linear + self.attention

    @property
    def total(self) -> int:
        """All FLOPs of the vision module."""
        return self.embed + self.blocks + self.ipcv_ops + self.head

    def to_dict(self) -> dict[str, int]:
        """Plain dict with the derived totals."""
        return {**asdict(self), "blocks": self.blocks, "total": self.total}


def _block(
    shape: EncoderShape,
    index: int,
    queries: int,
    keys: int,
    mlp_rows: int,
    pruned: bool = False,
    run: WindowRun = "eager",
) -> tuple[int, int]:
    d = shape.width
    linear = 2 * queries * d * d + 2 * keys * d * 2 * d  # q, then k and v
    linear += 2 * queries * d * d  # output projection
    linear += 2 * mlp_rows * d * shape.mlp_hidden * shape.mlp_matrices
    attention = 2 * 2 * shape.pairs(index, queries, keys, pruned, run) * d  # QK^T and AV
    return linear, attention


def encoder_flops(
    shape: EncoderShape,
    config: IPCVConfig | None = None,
    form: AttentionForm = "kept_query",
    run: WindowRun = "eager",
) -> FlopBreakdown:
    """FLOPs per image of the dense encoder (``config=None``) or of IPCV.

    Args:
        shape: the encoder at one image size.
        config: IPCV settings, or ``None`` for the dense encoder.
        form: AS blocks as this project runs them (``kept_query``: queries, output projection
            and MLP for the P kept rows only) or as the reference code does (``full_query``:
            queries and attention output for all N rows, MLP for the kept rows).
        run: how windowed blocks run (``WindowRun``).

    Returns:
        The ``FlopBreakdown``.
    """
    n = shape.tokens
    linear = attention = ops = 0
    if config is None:
        for index in range(shape.depth):
            block_linear, block_attention = _block(shape, index, n, n, n, run=run)
            linear += block_linear
            attention += block_attention
        return FlopBreakdown(shape.embed_flops, linear, attention, 0, shape.head_flops)
    config.check_depth(shape.depth)
    p = config.kept_count(n, shape.num_prefix)
    r = n - p
    k = min(config.num_neighbors, p)
    d = shape.width
    as_blocks = min(config.as_layers, shape.depth - config.prune_layer)
    pruned_blocks = shape.depth - config.prune_layer - as_blocks
    stages = (
        (config.prune_layer, n, n, n),
        (as_blocks, p if form == "kept_query" else n, n, p),
        (pruned_blocks, p, p, p),
    )
    index = 0
    for count, queries, keys, mlp_rows in stages:
        for _ in range(count):
            pruned = index >= config.prune_layer
            block_linear, block_attention = _block(
                shape, index, queries, keys, mlp_rows, pruned, run
            )
            linear += block_linear
            attention += block_attention
            index += 1
    ops += 3 * n * d  # selection score
    ops += 2 * r * p * d + 3 * (r + p) * d  # kNN distances
    ops += (as_blocks + 1) * (p * d + r * k * d + r * d)  # each NGR rebuild
    return FlopBreakdown(shape.embed_flops, linear, attention, ops, shape.head_flops)
