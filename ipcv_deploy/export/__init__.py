"""ONNX export of the (IPCV-compressed) vision encoder; imports onnx and onnxscript."""

from ipcv_deploy.export.onnx_export import (
    ONNX_OPSET,
    TARGETS,
    ExportOptions,
    NativeTokens,
    PixelRange,
    export_encoder,
    native_tokens,
)
from ipcv_deploy.export.schemas import register_schemas

__all__ = [
    "ONNX_OPSET",
    "TARGETS",
    "ExportOptions",
    "NativeTokens",
    "PixelRange",
    "export_encoder",
    "native_tokens",
    "register_schemas",
]
