"""Token-compression algorithms in pure torch on top of ``ops/``; no family names here."""

from ipcv_deploy.compression.attention import (
    banded_window_attention,
    segment_attention,
    window_attention,
)
from ipcv_deploy.compression.ipcv import (
    IPCVResult,
    PruneState,
    build_prune_state,
    dense_encode,
    gather_tokens,
    ipcv_encode,
    ipcv_encode_embedded,
)
from ipcv_deploy.compression.protocol import EncodedInput, EncoderAdapter, TokenSet

__all__ = [
    "EncodedInput",
    "EncoderAdapter",
    "IPCVResult",
    "PruneState",
    "TokenSet",
    "banded_window_attention",
    "build_prune_state",
    "dense_encode",
    "gather_tokens",
    "ipcv_encode",
    "ipcv_encode_embedded",
    "segment_attention",
    "window_attention",
]
