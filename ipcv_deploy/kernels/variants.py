"""What the ahead-of-time build needs to know about one compiled form of a Triton kernel."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["AotVariant"]


@dataclass(frozen=True)
class AotVariant:
    """One kernel specialisation compiled to cubin/PTX for the TensorRT plugin library.

    ``name`` is the C symbol stem the plugin launches (e.g. ``ipcv_ts_keys_fp16``);
    ``signature`` maps every non-constexpr argument, in call order, to its Triton type
    (``"*fp16"``, ``"*i64"``, ``"i32"``, ...); ``constexprs`` fixes the rest.
    """

    name: str
    kernel: Any  # a triton.runtime.jit.JITFunction
    signature: dict[str, str]
    constexprs: dict[str, int] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
