"""Token-compression algorithms in pure torch on top of ``ops/``; no family names here."""

from ipcv_deploy.compression.attention import segment_attention
from ipcv_deploy.compression.ipcv import IPCVResult, PruneState, build_prune_state, ipcv_encode
from ipcv_deploy.compression.protocol import EncodedInput, EncoderAdapter, TokenSet

__all__ = [
    "EncodedInput",
    "EncoderAdapter",
    "IPCVResult",
    "PruneState",
    "TokenSet",
    "build_prune_state",
    "ipcv_encode",
    "segment_attention",
]
