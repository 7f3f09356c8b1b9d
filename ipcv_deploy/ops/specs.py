"""The ``ipcv`` op contract: one frozen ``OpSpec`` per op, shared by every backend.

Shapes use the notation of ``../shared/specs/ipcv.md``: ``B`` rows (images, or pools of
images), ``N`` tokens per row, ``D`` width, ``P`` kept (attribute ``num_keep``), ``R = N - P``
pruned, ``k`` neighbours (attribute ``num_neighbors``). Index outputs are int64.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DOMAIN",
    "KERNEL_MAX_NEIGHBORS",
    "OPSET_VERSION",
    "OP_SPECS",
    "PLUGIN_NAMESPACE",
    "PLUGIN_VERSION",
    "RANKING",
    "AttrSpec",
    "OpSpec",
    "TensorSpec",
]

#: The ranking rule every implementation of the ops follows (reference, ONNX bodies, kernels).
RANKING = (
    "ties go to the lower index; TokenSelect ranks a NaN score as -inf (prefix tokens are "
    "still kept), NeighborIndex ranks a NaN distance as +inf"
)

DOMAIN = "ipcv"
OPSET_VERSION = 1
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "ipcv"
#: The largest ``num_neighbors`` the kernels (Triton, TensorRT plugins) take.
KERNEL_MAX_NEIGHBORS = 32


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, element kind (``float`` = fp32/fp16/bf16, ``int64``), shape."""

    name: str
    kind: str
    shape: tuple[str, ...]
    doc: str


@dataclass(frozen=True)
class AttrSpec:
    """An integer attribute with its smallest legal value."""

    name: str
    minimum: int
    doc: str


@dataclass(frozen=True)
class OpSpec:
    """One op of the contract.

    ``name`` is the ONNX op_type and TensorRT plugin name, ``torch_name`` the
    ``torch.library`` op name in namespace ``ipcv``.
    """

    name: str
    torch_name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attributes: tuple[AttrSpec, ...]
    doc: str


TOKEN_SELECT = OpSpec(
    name="TokenSelect",
    torch_name="token_select",
    inputs=(
        TensorSpec("h_prev", "float", ("B", "N", "D"), "hidden states entering block K-1"),
        TensorSpec("h_cur", "float", ("B", "N", "D"), "hidden states entering block K"),
    ),
    outputs=(
        TensorSpec("keep_idx", "int64", ("B", "P"), "kept token indices, ascending"),
        TensorSpec("drop_idx", "int64", ("B", "R"), "pruned token indices, ascending"),
    ),
    attributes=(
        AttrSpec(
            "num_keep",
            1,
            "P, tokens kept per row (prefix tokens included); with keep_num > 0 its fixed part",
        ),
        AttrSpec("num_prefix", 0, "leading tokens of each row always kept (CLS)"),
        AttrSpec(
            "keep_num",
            0,
            "P = num_keep + (N - num_prefix) * keep_num // keep_den, for "
            "a token count N known only at run time; 0: P = num_keep",
        ),
        AttrSpec("keep_den", 1, "denominator of keep_num"),
    ),
    doc="fp32 score ||h_cur - h_prev||_2 per token, top-P (prefix forced; ties: lower index; "
    "NaN as -inf), both sets sorted.",
)

NEIGHBOR_INDEX = OpSpec(
    name="NeighborIndex",
    torch_name="neighbor_index",
    inputs=(
        TensorSpec("x_keep", "float", ("B", "P", "D"), "kept tokens at block K"),
        TensorSpec("x_drop", "float", ("B", "R", "D"), "pruned tokens at block K"),
    ),
    outputs=(TensorSpec("nbr", "int64", ("B", "R", "k"), "k nearest kept tokens, nearest first"),),
    attributes=(AttrSpec("num_neighbors", 1, "k, neighbours per pruned token (k <= P)"),),
    doc="Euclidean kNN in fp32 via |a|^2 + |b|^2 - 2ab^T, then the k smallest (ties: lower "
    "index; NaN as +inf).",
)

NEIGHBOR_RECONSTRUCT = OpSpec(
    name="NeighborReconstruct",
    torch_name="neighbor_reconstruct",
    inputs=(
        TensorSpec("x_keep", "float", ("B", "P", "D"), "kept tokens now"),
        TensorSpec("x0_keep", "float", ("B", "P", "D"), "kept tokens at block K"),
        TensorSpec("x0_drop", "float", ("B", "R", "D"), "pruned tokens at block K"),
        TensorSpec("nbr", "int64", ("B", "R", "k"), "from NeighborIndex"),
        TensorSpec("keep_idx", "int64", ("B", "P"), "from TokenSelect"),
        TensorSpec("drop_idx", "int64", ("B", "R"), "from TokenSelect"),
    ),
    outputs=(TensorSpec("full", "float", ("B", "N", "D"), "all N tokens, original order"),),
    attributes=(),
    doc="NGR: x0_drop + mean of the neighbours' drift (fp32), scattered back with x_keep.",
)

OP_SPECS: tuple[OpSpec, ...] = (TOKEN_SELECT, NEIGHBOR_INDEX, NEIGHBOR_RECONSTRUCT)
