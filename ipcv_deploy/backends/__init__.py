"""Vision backends behind one interface: PyTorch (the reference), ONNX Runtime, TensorRT.

Each takes row-form pixels ``[B, ...]`` (one image per row, the artifact's image size) and
returns the artifact's outputs by name. ``onnxruntime`` is imported only when used.
"""

from ipcv_deploy.backends.base import VisionBackend
from ipcv_deploy.backends.torch_backend import RowEncoder, TorchBackend

__all__ = ["RowEncoder", "TorchBackend", "VisionBackend"]
