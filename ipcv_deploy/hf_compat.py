"""Every use of a transformers API that is private or renamed between releases, in one place.

transformers moves fast: 5.24 renamed the ``past_key_values`` argument of every decoder to
``cache``, and a hook that read the old name silently stopped cutting the KV cache. So the
runtime touches transformers internals only through the functions below, each with the reason
it needs them, and ``pyproject.toml`` declares the tested range (lower and upper bound; CI runs
the runtime tests at both ends). Anything a release changes should fail here, loudly, rather
than give wrong answers.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
import transformers
from torch import nn
from transformers.image_utils import SizeDict
from transformers.integrations.sdpa_attention import sdpa_attention_forward as _sdpa
from transformers.masking_utils import (
    AttentionMaskInterface,
    create_causal_mask,
    create_sliding_window_causal_mask,
    sdpa_mask,
)
from transformers.modeling_utils import AttentionInterface

from ipcv_deploy.errors import CompatibilityError, ConfigError

__all__ = [
    "CACHE_ARGUMENTS",
    "attention_implementation",
    "cache_argument",
    "cache_lengths",
    "cache_tensors",
    "cut_cache",
    "exact_size_image_processor",
    "images_only_processor",
    "prefill_position_ids",
    "prefix_lm_mask",
    "register_attention",
    "sdpa_attention",
]

#: The decoders' name for the KV cache argument: ``cache`` from 5.24, ``past_key_values``
#: before (still accepted there as a deprecated alias).
CACHE_ARGUMENTS = ("cache", "past_key_values")


def _incompatible(what: str) -> CompatibilityError:
    return CompatibilityError(
        f"{what} (transformers {transformers.__version__}); install a transformers version in "
        "the range ipcv-deploy declares (pip install -e . resolves one)"
    )


# --- the decoder's cache argument ---------------------------------------------------------------
@functools.cache
def _cache_parameter(forward: Callable[..., Any]) -> str:
    params = inspect.signature(forward).parameters
    for name in CACHE_ARGUMENTS:
        if name in params:
            return name
    raise _incompatible(f"{forward.__qualname__} takes neither `cache` nor `past_key_values`")


def cache_argument(decoder: nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for ``decoder(...)``, under the name this transformers uses."""
    return {_cache_parameter(type(decoder).forward): cache}


# --- KV cache internals -------------------------------------------------------------------------
# ``DynamicCache.layers[i].keys / .values`` ([B, kv_heads, L, d]) are the cache's storage. LLM-side
# pruning must shorten them in place for the layers that ran before the pruning layer; there is
# no public API for removing positions from a cache.
def _layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(layer, "keys") for layer in layers):
        raise _incompatible(f"{type(cache).__name__} has no per-layer keys / values")
    return list(layers)


def cut_cache(cache: Any, keep: torch.Tensor, upto: int) -> None:
    """Keep only sequence positions ``keep`` [B, L'] in the KV of layers ``0 .. upto - 1``."""
    for layer in _layers(cache)[:upto]:
        for name in ("keys", "values"):
            stored = getattr(layer, name)
            if stored is None or stored.ndim != 4:
                raise _incompatible(f"a cache layer holds {name} of an unexpected layout")
            index = keep[:, None, :, None].expand(-1, stored.shape[1], -1, stored.shape[-1])
            setattr(layer, name, stored.gather(2, index))


def cache_lengths(cache: Any) -> list[int]:
    """Positions held by each layer's keys (0 for a layer that holds none)."""
    return [0 if layer.keys is None else int(layer.keys.shape[-2]) for layer in _layers(cache)]


def cache_tensors(cache: Any) -> Iterator[torch.Tensor]:
    """Every key and value tensor the cache holds."""
    for layer in _layers(cache):
        for t in (layer.keys, layer.values):
            if t is not None:
                yield t


# --- prefill positions ----------------------------------------------------------------------------
def prefill_position_ids(model: nn.Module, ids: torch.Tensor, kwargs: dict[str, Any]) -> Any:
    """The position ids ``generate`` would use for the prompt (3-D mRoPE for Qwen-VL models).

    ``_prepare_position_ids_for_generation`` is private, but it is the one function that
    computes exactly what ``generate`` feeds the decoder; reimplementing mRoPE would drift.
    """
    prepare = getattr(model, "_prepare_position_ids_for_generation", None)
    if prepare is None:
        raise _incompatible(f"{type(model).__name__} has no _prepare_position_ids_for_generation")
    return prepare(ids, {"input_ids": ids, **kwargs})


# --- prefix-LM masks ---------------------------------------------------------------------------
def prefix_lm_mask(
    decoder: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    blocks: torch.Tensor,
) -> Any:
    """The prefill mask of a prefix-LM decoder, padding masked.

    Tokens of one block (equal ``blocks`` id >= 0) attend to each other both ways, the rest
    causally.
    It is what PaliGemma's own forward builds (``create_causal_mask`` with
    ``block_sequence_ids``, and the sliding-window mask beside it for decoders with sliding
    layers), built here because the runtime calls the decoder directly. The cache argument is
    passed by position: its name changed in 5.24.
    """
    config = decoder.config
    args = (config, inputs_embeds, attention_mask, None, position_ids)
    full = create_causal_mask(*args, block_sequence_ids=blocks)
    if "sliding_attention" not in (getattr(config, "layer_types", None) or ()):
        return full
    sliding = create_sliding_window_causal_mask(*args, block_sequence_ids=blocks)
    return {"full_attention": full, "sliding_attention": sliding}


# --- attention implementation ---------------------------------------------------------------------
def sdpa_attention(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Transformers' own SDPA attention function (what ``attn_implementation='sdpa'`` runs)."""
    return _sdpa(module, *args, **kwargs)


def register_attention(name: str, forward: Callable[..., Any]) -> None:
    """Register ``forward`` as attention implementation ``name`` (with SDPA's mask format)."""
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)


@contextlib.contextmanager
def attention_implementation(config: Any, name: str, allowed: tuple[str, ...]) -> Iterator[None]:
    """Switch the decoder of ``config`` to attention ``name`` while inside.

    ``config._attn_implementation`` is what every layer reads at call time; switching it for
    one forward keeps fused SDPA everywhere else (``set_attn_implementation`` would re-check
    and rewrite the whole model's configs).

    Raises:
        ConfigError: the decoder runs an implementation not in ``allowed``.
    """
    previous = getattr(config, "_attn_implementation", None)
    if previous not in (*allowed, name):
        raise ConfigError(
            f"LLM-side pruning records attention from SDPA, but the LLM runs {previous!r} "
            "attention; load the model with attn_implementation='sdpa' (the default) or drop "
            "--llm-pruning"
        )
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


# --- processors -----------------------------------------------------------------------------------
def images_only_processor(cls: type) -> type:
    """``cls`` accepting ``None`` as its video processor.

    The Qwen / InternVL processors insist on a video processor, which needs torchvision; the
    presets process images only. ``check_argument_for_proper_class`` is the processor's
    internal argument check.
    """

    class ImagesOnly(cls):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument is None and "video" in argument_name:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = cls.__name__
    return ImagesOnly


def _base_class(cls: type) -> type:
    return getattr(cls, "_exact_base", cls)


def exact_size_image_processor(images: Any, height: int, width: int) -> None:
    """Make a Qwen-style image processor resize every image to exactly ``height`` x ``width``.

    Its ``resize`` skips ``smart_resize`` (which keeps the aspect ratio) and calls the backend's
    plain resize; the backends live in the internal ``image_processing_backends`` module.
    """
    images.__class__ = _exact_size_class(_base_class(type(images)), height, width)


@functools.cache
def _exact_size_class(cls: type, height: int, width: int) -> type:
    backend = next(
        (c for c in cls.__mro__ if c.__module__.endswith("image_processing_backends")), None
    )
    if backend is None:
        raise _incompatible(f"{cls.__name__} has no image-processing backend class")

    class ExactSize(cls):
        _exact_base = cls

        def resize(self, *args: Any, **kwargs: Any) -> Any:
            image = args[0] if args else kwargs.get("image", kwargs.get("images"))
            resample = kwargs.get("resample", args[2] if len(args) > 2 else None)
            return backend.resize(self, image, SizeDict(height=height, width=width), resample)

    ExactSize.__name__ = ExactSize.__qualname__ = cls.__name__
    return ExactSize
