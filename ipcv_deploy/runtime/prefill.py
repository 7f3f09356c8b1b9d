"""Prune image tokens once, inside the LLM's prefill, at the input of layer ``K_llm``.

``PrefillPruner`` installs forward pre-hooks on the decoder layers for the duration of one
prefill: layer ``K_llm - 1``'s attention is recorded (``runtime.attention``), layer ``K_llm``
picks the kept image tokens per sample, shortens the hidden states, the attention mask, the
rotary tables and position ids it was given, and cuts the KV cache of the layers already run
to the same positions; every later layer gets the same shortened inputs. Kept tokens keep
their original rotary positions (the tables are gathered, never recomputed), so nothing is
renumbered. The rest of the forward is the model's own code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ipcv_deploy.compression.llm_pruning import (
    LLMPruningConfig,
    dart_select,
    fastv_select,
    tokencarve_select,
)
from ipcv_deploy.errors import CompatibilityError, InputError
from ipcv_deploy.hf_compat import CACHE_ARGUMENTS, cache_lengths, cut_cache
from ipcv_deploy.runtime.attention import AttentionRecord, recording_attention

__all__ = ["PrefillPruner", "PruningOutcome"]


@dataclass(frozen=True)
class PruningOutcome:
    """What LLM-side pruning kept.

    Attributes:
        positions: [B, L'] sequence positions kept (text, padding, kept image tokens), ascending.
        image_kept: [B, n] positions of the kept image tokens.
        image_tokens: image tokens per sample before pruning.
    """

    positions: torch.Tensor
    image_kept: torch.Tensor
    image_tokens: int


def _gather_seq(t: torch.Tensor, keep: torch.Tensor, dim: int, batch_dim: int = 0) -> torch.Tensor:
    """Gather ``t`` along sequence dim ``dim`` with per-sample ``keep`` [B, L']."""
    dim = dim % t.ndim
    shape = list(t.shape)
    shape[batch_dim] = keep.shape[0]
    t = t.expand(shape)
    view = [1] * t.ndim
    view[batch_dim], view[dim] = keep.shape
    index_shape = list(t.shape)
    index_shape[dim] = keep.shape[1]
    return t.gather(dim, keep.view(view).expand(index_shape))


def _unexpected(name: str, value: Any, want: str) -> CompatibilityError:
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
    return CompatibilityError(
        f"LLM-side pruning got decoder-layer input {name} of layout {shape}, expected {want}; "
        "this transformers release passes prefill inputs in a way the pruner does not know"
    )


def _batch_ok(t: torch.Tensor, dim: int, batch: int) -> bool:
    return t.shape[dim] in (1, batch)


def _shrink_mask(mask: Any, keep: torch.Tensor, length: int) -> Any:
    """A 4-D [B, 1, L, L] mask gathered on both sequence axes (``None`` stays ``None``)."""
    if mask is None:
        return None
    if (
        not isinstance(mask, torch.Tensor)
        or mask.ndim != 4
        or mask.shape[-2:] != (length, length)
        or not _batch_ok(mask, 0, keep.shape[0])
    ):
        raise _unexpected("attention_mask", mask, f"None or a [batch, 1, {length}, {length}] mask")
    return _gather_seq(_gather_seq(mask, keep, -2), keep, -1)


def _shrink_positions(positions: Any, keep: torch.Tensor, length: int) -> Any:
    """[B, L] or [R, B, L] (multi-axis rotary) positions gathered to the kept positions."""
    if positions is None:
        return None
    if (
        not isinstance(positions, torch.Tensor)
        or positions.ndim not in (2, 3)
        or positions.shape[-1] != length
        or not _batch_ok(positions, -2, keep.shape[0])
    ):
        raise _unexpected(
            "position_ids", positions, f"[batch, {length}] or [axes, batch, {length}]"
        )
    return _gather_seq(positions, keep, -1, batch_dim=positions.ndim - 2)


def _shrink_rotary(tables: Any, keep: torch.Tensor, length: int) -> Any:
    """(cos, sin), each [B, L, d] or [R, B, L, d], gathered to the kept positions."""
    if tables is None:
        return None
    if not isinstance(tables, tuple) or not all(
        isinstance(t, torch.Tensor)
        and t.ndim in (3, 4)
        and t.shape[-2] == length
        and _batch_ok(t, -3, keep.shape[0])
        for t in tables
    ):
        raise _unexpected(
            "position_embeddings", tables, f"(cos, sin) of [batch, {length}, head_dim]"
        )
    return tuple(_gather_seq(t, keep, -2, batch_dim=t.ndim - 3) for t in tables)


def _shrink_cache_position(cache_position: Any, kept: int, length: int) -> Any:
    """The cache slots the kept tokens are written to: the first ``kept`` of the prompt's."""
    if cache_position is None:
        return None
    if not isinstance(cache_position, torch.Tensor) or tuple(cache_position.shape) != (length,):
        raise _unexpected("cache_position", cache_position, f"[{length}]")
    return cache_position[:kept]


#: Decoder-layer keyword inputs that carry no sequence axis.
_PASS_THROUGH = frozenset({"hidden_states", "use_cache", "output_attentions", *CACHE_ARGUMENTS})


def _has_sequence_axis(value: Any, length: int) -> bool:
    tensors = value if isinstance(value, (tuple, list)) else (value,)
    return any(isinstance(t, torch.Tensor) and length in t.shape for t in tensors)


class PrefillPruner:
    """Context manager: LLM-side pruning for one prefill forward of ``layers``.

    Args:
        layers: the decoder layers (``language_model.layers``).
        text_config: the decoder's config (its attention implementation is switched to the
            recording SDPA inside the block).
        config: method and budget.
        layer: ``K_llm`` (already checked against the depth).
        image_mask: [B, L] True on image placeholder rows.
        attention_mask: [B, L] 1 on real tokens, 0 on padding.
        cache: the KV cache the prefill fills; the layers before ``layer`` are cut in it.
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        text_config: Any,
        config: LLMPruningConfig,
        layer: int,
        image_mask: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any,
    ) -> None:
        self.layers = layers
        self.cache = cache
        self.text_config = text_config
        self.config = config
        self.layer = layer
        self.image_mask = image_mask
        self.valid = attention_mask.bool()
        self.length = image_mask.shape[1]
        self.record = AttentionRecord(layer - 1, want_row=config.method != "dart")
        self.outcome: PruningOutcome | None = None
        self._handles: list[Any] = []
        self._recording: Any = None

    def __enter__(self) -> PrefillPruner:
        self._recording = recording_attention(self.text_config, self.record)
        self._recording.__enter__()
        for index in range(self.layer, len(self.layers)):
            hook = self._prune if index == self.layer else self._follow
            self._handles.append(
                self.layers[index].register_forward_pre_hook(hook, with_kwargs=True)
            )
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._recording.__exit__(*exc)

    # --- hooks -------------------------------------------------------------------------------
    def _prune(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        keep, image_kept, hidden = self._select(hidden)
        self.outcome = PruningOutcome(keep, image_kept, int(self.image_mask[0].sum()))
        cut_cache(self.cache, keep, self.layer)
        return (hidden, *args[1:]), self._shrink(kwargs)

    def _follow(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, self._shrink(kwargs)

    def _shrink(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Every sequence-long input of a decoder layer, cut to the kept positions.

        Raises:
            CompatibilityError: an input of a layout the pruner does not know (never passed
                through unchanged, which would silently mix pruned and unpruned shapes).
        """
        keep, length = self.outcome.positions, self.length
        shrink = {
            "attention_mask": lambda v: _shrink_mask(v, keep, length),
            "position_ids": lambda v: _shrink_positions(v, keep, length),
            "position_embeddings": lambda v: _shrink_rotary(v, keep, length),
            "cache_position": lambda v: _shrink_cache_position(v, keep.shape[1], length),
        }
        out = {}
        for name, value in kwargs.items():
            if name in shrink:
                out[name] = shrink[name](value)
            elif name in _PASS_THROUGH or not _has_sequence_axis(value, length):
                out[name] = value
            else:
                raise _unexpected(name, value, "an input the pruner knows")
        return out

    def check_cache(self) -> None:
        """After the prefill: every layer's KV holds exactly the kept positions.

        Raises:
            CompatibilityError: some layer's cache was not cut (or was cut twice).
        """
        kept = self.outcome.positions.shape[1] if self.outcome is not None else None
        lengths = cache_lengths(self.cache)
        if kept is None or any(n != kept for n in lengths):
            raise CompatibilityError(
                f"after LLM-side pruning the KV cache holds {lengths} positions per layer, "
                f"expected {kept} in every layer; the pruner did not reach every layer"
            )

    # --- selection ---------------------------------------------------------------------------
    def _select(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sample: kept image positions; returns kept positions, kept image, new states."""
        hidden = hidden.clone()
        rows, images = [], []
        for b in range(hidden.shape[0]):
            image = self.image_mask[b].nonzero().squeeze(1)
            kept = self._select_one(b, image, hidden)
            dropped = self.image_mask[b].clone()
            dropped[image[kept]] = False
            rows.append((~dropped).nonzero().squeeze(1))
            images.append(image[kept])
        if len({r.numel() for r in rows}) != 1:
            raise InputError(
                "LLM-side pruning needs the same number of image tokens in every prompt of a "
                "batch; resize the images to one size or run them in separate batches"
            )
        keep = torch.stack(rows).to(hidden.device)
        return keep, torch.stack(images), _gather_seq(hidden, keep, -2)

    def _select_one(self, b: int, image: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        config = self.config
        budget = config.budget(image.numel())
        if config.method == "dart":
            after = self.valid[b] & ~self.image_mask[b]
            after[: int(image.max()) + 1] = False
            text = after.nonzero().squeeze(1)
            return dart_select(hidden[b], self.record.keys[b], image, text, config.keep)
        row = self.record.last_row[b, image]
        if config.method == "fastv":
            return fastv_select(row, budget)
        carved = tokencarve_select(row, hidden[b, image], budget)
        hidden[b, image[carved.kept]] = carved.states
        return carved.kept
