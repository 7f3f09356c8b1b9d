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
from ipcv_deploy.errors import InputError
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


def _shrink_mask(mask: Any, keep: torch.Tensor, length: int) -> Any:
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or mask.shape[-2:] != (length, length):
        return mask
    return _gather_seq(_gather_seq(mask, keep, -2), keep, -1)


def _shrink_positions(positions: Any, keep: torch.Tensor, length: int) -> Any:
    if not isinstance(positions, torch.Tensor) or positions.shape[-1] != length:
        return positions
    # [B, L] or [R, B, L] (multi-axis rotary positions)
    return _gather_seq(positions, keep, -1, batch_dim=positions.ndim - 2)


def _shrink_rotary(tables: Any, keep: torch.Tensor, length: int) -> Any:
    if not isinstance(tables, tuple):
        return tables
    return tuple(
        _gather_seq(t, keep, -2) if t.ndim >= 3 and t.shape[-2] == length else t for t in tables
    )


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
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        text_config: Any,
        config: LLMPruningConfig,
        layer: int,
        image_mask: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> None:
        self.layers = layers
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
        cache = kwargs.get("past_key_values")
        if cache is not None:
            for done in cache.layers[: self.layer]:
                done.keys = _gather_seq(done.keys, keep, -2)
                done.values = _gather_seq(done.values, keep, -2)
        return (hidden, *args[1:]), self._shrink(kwargs)

    def _follow(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, self._shrink(kwargs)

    def _shrink(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        keep, length = self.outcome.positions, self.length
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = _shrink_mask(kwargs.get("attention_mask"), keep, length)
        kwargs["position_ids"] = _shrink_positions(kwargs.get("position_ids"), keep, length)
        kwargs["position_embeddings"] = _shrink_rotary(
            kwargs.get("position_embeddings"), keep, length
        )
        return kwargs

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
