"""TensorRT: the static graph check, engine builder and runner, and the ipcv CUDA kernels.

``tensorrt`` is imported only when an engine is built or run; the static check and the
kernel harness work without it.
"""
