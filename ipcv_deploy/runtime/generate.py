"""Prefill (with optional LLM-side pruning) and token-by-token decoding on a transformers LLM.

The LLM is the checkpoint's own decoder (``language_model``) and head, called with
``inputs_embeds`` at prefill and token embeddings after; the KV cache is transformers'
``DynamicCache``. Positions are the model's own prefill positions (3-D mRoPE for Qwen2-VL),
and every decoded token continues from the last prompt position, so pruned sequences keep
the dense model's positions. Greedy by default; temperature / top-p sampling with a seed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from ipcv_deploy.compression.llm_pruning import LLMPruningConfig
from ipcv_deploy.errors import InputError
from ipcv_deploy.hf_compat import cache_argument, cache_tensors, prefix_lm_mask
from ipcv_deploy.models import synchronize
from ipcv_deploy.runtime.answers import SamplingConfig
from ipcv_deploy.runtime.prefill import PrefillPruner, PruningOutcome

__all__ = [
    "Generation",
    "LLMInputs",
    "SamplingConfig",
    "check_left_padded",
    "generate",
    "kv_cache_bytes",
]

#: Called after every decoding step with the step index and the new token of every sample
#: (the pad id for a sample already done). It may return, per sample, whether to stop that
#: sample now (a stop string matched, a client went away); ``None`` changes nothing.
TokenCallback = Callable[[int, torch.Tensor], Sequence[bool] | None]


@dataclass(frozen=True)
class LLMInputs:
    """A padded (left) batch of prompts with image embeddings already stitched in.

    Attributes:
        input_ids: [B, L] token ids (image placeholders included).
        attention_mask: [B, L] 1 on tokens, 0 on left padding.
        inputs_embeds: [B, L, D] token embeddings with image features in placeholder rows.
        position_ids: the model's prefill positions, [B, L] or [R, B, L] (mRoPE).
        image_mask: [B, L] True on visual placeholder rows (images and videos: what
            LLM-side pruning may drop).
        prefix_blocks: [B, L] spans attended both ways at prefill (prefix-LM models: equal
            ids >= 0 see each other, -1 is causal), ``None`` for a causal LLM.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    image_mask: torch.Tensor
    prefix_blocks: torch.Tensor | None = None


@dataclass
class Generation:
    """Generated tokens and what the LLM did.

    Attributes:
        tokens: [B, T] new tokens; after a sample's end-of-sequence, the pad id.
        lengths: new tokens per sample, end-of-sequence included.
        prefill_s: prefill time (prompt through all layers, first token chosen).
        decode_s: time of the remaining steps.
        prompt_tokens: prompt length (padded) before LLM-side pruning.
        kv_tokens: cache length after prefill (after pruning).
        kv_bytes: KV cache size after prefill.
        pruning: what LLM-side pruning kept, if it ran.
        scores: [B, T, V] logits of every step, when asked for.
    """

    tokens: torch.Tensor
    lengths: list[int]
    prefill_s: float
    decode_s: float
    prompt_tokens: int
    kv_tokens: int
    kv_bytes: int
    pruning: PruningOutcome | None
    scores: torch.Tensor | None = None


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, layers, norm) inside a multimodal model."""
    inner = getattr(model, "model", model)
    return getattr(inner, "language_model", inner)


def kv_cache_bytes(cache: DynamicCache) -> int:
    """Bytes held by the keys and values of every layer."""
    return sum(t.numel() * t.element_size() for t in cache_tensors(cache))


def check_left_padded(attention_mask: torch.Tensor) -> None:
    """Raise ``InputError`` unless every row is padding first, then tokens (left padding).

    Decoding appends every new token at the right end and continues positions from the last
    prompt token, which is only right when the padding is on the left.
    """
    mask = attention_mask.bool()
    started = mask.cummax(dim=1).values
    if bool((started & ~mask).any()) or not bool(mask[:, -1].all()):
        raise InputError(
            "the prompt batch is not left-padded (padding after tokens); set the tokenizer's "
            "padding_side='left' or run the prompts one at a time"
        )


def _token_ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _choose(logits: torch.Tensor, sampling: SamplingConfig, rng: torch.Generator) -> torch.Tensor:
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / sampling.temperature).softmax(-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=rng).squeeze(-1)


def _callback(
    on_token: TokenCallback | None, step: int, token: torch.Tensor, done: torch.Tensor
) -> torch.Tensor:
    """Call ``on_token``; returns ``done`` with the samples it asked to stop."""
    stop = None if on_token is None else on_token(step, token)
    if stop is None:
        return done
    return done | torch.as_tensor(list(stop), dtype=torch.bool, device=done.device)


@torch.no_grad()
def generate(
    model: nn.Module,
    inputs: LLMInputs,
    sampling: SamplingConfig,
    pruning: LLMPruningConfig | None = None,
    pruning_layer: int | None = None,
    on_token: TokenCallback | None = None,
    return_scores: bool = False,
) -> Generation:
    """Prefill ``inputs`` (pruning image tokens at ``pruning_layer`` if asked), then decode.

    Args:
        model: a transformers multimodal (or causal) LM; its vision tower is not used.
        inputs: the stitched prompt batch.
        sampling: decoding settings.
        pruning: LLM-side pruning, or ``None``.
        pruning_layer: ``K_llm`` (checked by the caller with ``resolve_layer``).
        on_token: streaming callback.
        return_scores: keep the logits of every step (``Generation.scores``).
    """
    decoder = language_model(model)
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    generation_config = getattr(model, "generation_config", None)
    eos = (
        _token_ids(getattr(generation_config, "eos_token_id", None)) if sampling.stop_at_eos else []
    )
    pad = getattr(generation_config, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if eos else 0)
    check_left_padded(inputs.attention_mask)
    device = inputs.inputs_embeds.device
    rng = torch.Generator(device=device).manual_seed(sampling.seed)  # on the logits' device
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
    cache = DynamicCache(config=decoder.config)
    mask = inputs.attention_mask

    start = time.perf_counter()
    pruner = None
    if pruning is not None:
        pruner = PrefillPruner(
            decoder.layers,
            decoder.config,
            pruning,
            pruning_layer,
            inputs.image_mask,
            inputs.attention_mask,
            cache,
        )
    with pruner if pruner is not None else contextlib.nullcontext():
        prefill_mask = mask
        if inputs.prefix_blocks is not None:  # built here, for the attention now in use
            prefill_mask = prefix_lm_mask(
                decoder, inputs.inputs_embeds, mask, inputs.position_ids, inputs.prefix_blocks
            )
        out = decoder(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=prefill_mask,
            position_ids=inputs.position_ids,
            use_cache=True,
            **cache_argument(decoder, cache),
        )
    if pruner is not None:
        pruner.check_cache()
        mask = mask.gather(1, pruner.outcome.positions)
    logits = head(out.last_hidden_state[:, -1])
    scores = [logits] if return_scores else None
    token = _choose(logits, sampling, rng)
    synchronize(device)
    prefill_s = time.perf_counter() - start
    kv_tokens, kv_bytes = cache.get_seq_length(), kv_cache_bytes(cache)

    batch = token.shape[0]
    tokens = [token]
    done = torch.isin(token, eos_ids)
    lengths = [1] * batch
    done = _callback(on_token, 0, token, done)
    last_position = inputs.position_ids[..., -1:]
    start = time.perf_counter()
    for step in range(1, sampling.max_new_tokens):
        if bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        out = decoder(
            inputs_embeds=embed(token[:, None]),
            attention_mask=mask,
            position_ids=last_position + step,
            use_cache=True,
            **cache_argument(decoder, cache),
        )
        logits = head(out.last_hidden_state[:, -1])
        if scores is not None:
            scores.append(logits)
        token = _choose(logits, sampling, rng)
        token = torch.where(done, torch.full_like(token, pad), token)
        for b in range(batch):
            lengths[b] += int(not done[b])
        done |= torch.isin(token, eos_ids)
        tokens.append(token)
        done = _callback(on_token, step, token, done)
    synchronize(device)
    decode_s = time.perf_counter() - start
    return Generation(
        tokens=torch.stack(tokens, dim=1),
        lengths=lengths,
        prefill_s=prefill_s,
        decode_s=decode_s,
        prompt_tokens=inputs.input_ids.shape[1],
        kv_tokens=kv_tokens,
        kv_bytes=kv_bytes,
        pruning=pruner.outcome if pruner is not None else None,
        scores=torch.stack(scores, dim=1) if scores is not None else None,
    )
