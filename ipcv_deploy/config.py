"""Frozen configuration dataclasses, validated on construction.

``IPCVConfig`` holds the settings of the IPCV algorithm (``../shared/specs/ipcv.md``); the
family defaults from the paper live with each model adapter (``reference_ipcv()``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from typing import Any, Literal

from ipcv_deploy.errors import ConfigError

__all__ = ["CONFIG_SCHEMA_VERSION", "SELECTION_MODES", "IPCVConfig", "SelectionMode"]

CONFIG_SCHEMA_VERSION = 1
SelectionMode = Literal["per_image", "global"]
SELECTION_MODES: tuple[str, ...] = ("per_image", "global")


@dataclass(frozen=True, kw_only=True, slots=True)
class IPCVConfig:
    """Settings of IPCV token pruning inside a ViT.

    Attributes:
        prune_layer: K, the block before which tokens are selected (K >= 2, K < depth).
        keep_ratio: fraction of tokens kept, in (0, 1]; the paper's ``1 - reduction``.
        as_layers: AS_layer, number of Attention Stabilization blocks from K (0 = off).
        num_neighbors: k (Top_K), nearest kept tokens used by NGR for each pruned token. The
            fixed-size forms (export, run) refuse a k above the kept count; the eager path
            (``apply_ipcv``, any image size) uses ``min(k, P)`` per image, as the reference.
        selection: ``"per_image"`` keeps a fixed count per image (batched / export form);
            ``"global"`` reproduces the reference: one top-k over every patch of the call where
            the family's reference does so (Qwen2-VL), and a neighbour pool over the whole call.
    """

    prune_layer: int = 3
    keep_ratio: float = 0.35
    as_layers: int = 7
    num_neighbors: int = 10
    selection: SelectionMode = "per_image"

    def __post_init__(self) -> None:
        """Validate every field; raise ``ConfigError`` naming the field, the value and the fix."""
        _check_int("prune_layer", self.prune_layer)
        _check_int("as_layers", self.as_layers)
        _check_int("num_neighbors", self.num_neighbors)
        if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)):
            raise ConfigError(
                f"keep_ratio must be a number, got {self.keep_ratio!r}; pass e.g. 0.35"
            )
        if not math.isfinite(self.keep_ratio) or not 0.0 < self.keep_ratio <= 1.0:
            raise ConfigError(
                f"keep_ratio must be in (0, 1], got {self.keep_ratio}; "
                "pass the fraction of tokens to keep, e.g. 0.35"
            )
        if self.prune_layer < 2:
            raise ConfigError(
                f"prune_layer (K) must be >= 2, got {self.prune_layer}; block K-1 must exist "
                "to score tokens; the paper uses K=3 or K=7"
            )
        if self.as_layers < 0:
            raise ConfigError(
                f"as_layers must be >= 0, got {self.as_layers}; pass 0 to turn Attention "
                "Stabilization off"
            )
        if self.num_neighbors < 1:
            raise ConfigError(
                f"num_neighbors (k) must be >= 1, got {self.num_neighbors}; the reference uses 10"
            )
        if self.selection not in SELECTION_MODES:
            raise ConfigError(
                f"selection must be one of {', '.join(SELECTION_MODES)}, got {self.selection!r}"
            )

    @classmethod
    def from_reduction(cls, reduction: float, **kwargs: Any) -> IPCVConfig:
        """Build a config from the paper's ``reduction`` (fraction of tokens removed).

        Raises:
            ConfigError: if ``reduction`` is not in [0, 1).
        """
        if isinstance(reduction, bool) or not isinstance(reduction, (int, float)):
            raise ConfigError(f"reduction must be a number, got {reduction!r}; pass e.g. 0.65")
        if not math.isfinite(reduction) or not 0.0 <= reduction < 1.0:
            raise ConfigError(
                f"reduction must be in [0, 1), got {reduction}; pass the fraction of tokens to "
                "remove, e.g. 0.65 (keep 35%)"
            )
        return cls(keep_ratio=1.0 - reduction, **kwargs)

    @property
    def reduction(self) -> float:
        """The paper's reduction: fraction of tokens removed at block K."""
        return 1.0 - self.keep_ratio

    @property
    def as_end(self) -> int:
        """First block after the Attention Stabilization window (at most the depth)."""
        return self.prune_layer + self.as_layers

    @property
    def keep_fraction(self) -> tuple[int, int]:
        """``keep_ratio`` as an exact fraction (numerator, denominator <= 10000), e.g. (7, 20).

        Kept counts are ``floor(rest * numerator / denominator)`` in integers, the same in
        Python, traced graphs, ONNX bodies and TensorRT shape expressions.
        """
        fraction = Fraction(repr(self.keep_ratio)).limit_denominator(10_000)
        return fraction.numerator, fraction.denominator

    def kept_count(self, num_tokens: Any, num_prefix: int = 0) -> Any:
        """Tokens kept out of ``num_tokens``: prefix (CLS) tokens plus ``floor(rest * keep)``.

        At least one non-prefix token is kept, and never more than there are. A symbolic
        token count (``torch.SymInt``, a native-resolution export) gives the unclamped
        expression; the export's token range keeps it inside those bounds.
        """
        rest = num_tokens - num_prefix
        num, den = self.keep_fraction
        share = rest * num // den
        if not isinstance(share, int):
            return num_prefix + share
        return num_prefix + min(rest, max(1, share))

    def check_depth(self, depth: int) -> None:
        """Check that K and the AS window fit an encoder of ``depth`` blocks.

        Raises:
            ConfigError: if ``prune_layer >= depth`` or ``prune_layer + as_layers > depth``.
        """
        if self.prune_layer >= depth:
            raise ConfigError(
                f"prune_layer (K) must be < the encoder depth {depth}, got {self.prune_layer}; "
                f"pick K in [2, {depth - 1}]"
            )
        if self.as_end > depth:
            raise ConfigError(
                f"as_layers={self.as_layers} runs past the encoder: K={self.prune_layer} + "
                f"{self.as_layers} > {depth} blocks; pass --as-layers at most "
                f"{depth - self.prune_layer} (every block after K is then an AS block)"
            )

    def check_neighbors(self, kept: int) -> None:
        """Check that k neighbours exist among the ``kept`` tokens of an image.

        Raises:
            ConfigError: if ``num_neighbors > kept``.
        """
        if self.num_neighbors > kept:
            raise ConfigError(
                f"num_neighbors (k) = {self.num_neighbors} exceeds the {kept} tokens kept per "
                f"image; pass --num-neighbors at most {kept} or a larger --keep-ratio"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for manifests and JSON reports; ``from_dict`` reads it back exactly."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IPCVConfig:
        """Inverse of ``to_dict``.

        Raises:
            ConfigError: on an unknown key or an invalid value.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown IPCV setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**data)


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
