"""The ``ipcv`` op kernels in Triton: one source for the GPU, the interpreter and the plugins.

``token_select``, ``neighbor_index`` and ``neighbor_reconstruct`` take the arguments of the
reference ops in ``ipcv_deploy.ops`` and give the same outputs, on CUDA tensors, or on CPU
tensors when ``TRITON_INTERPRET=1`` was set before triton was imported. ``AOT_VARIANTS`` lists
every kernel specialisation the TensorRT plugins launch; the modules ``token_select`` and
``neighbors`` document each op's host launch sequence and workspace. The function
``token_select`` shadows its module here: import the module's names with ``from
ipcv_deploy.kernels.token_select import ...``.

triton is an optional dependency: importing this package without it raises
``BackendUnavailableError``; ``import ipcv_deploy`` never imports it.
"""

from ipcv_deploy.errors import BackendUnavailableError

try:
    import triton  # noqa: F401  (only checked here; the kernel modules use it)
except ImportError as exc:
    raise BackendUnavailableError(
        "ipcv_deploy.kernels needs triton: pip install 'triton>=3.9'"
    ) from exc

from ipcv_deploy.kernels import neighbors as _neighbors
from ipcv_deploy.kernels import token_select as _token_select
from ipcv_deploy.kernels.neighbors import neighbor_index, neighbor_reconstruct
from ipcv_deploy.kernels.token_select import token_select
from ipcv_deploy.kernels.variants import AotVariant

#: Every kernel specialisation of the three ops, TokenSelect's in launch order first.
AOT_VARIANTS: tuple[AotVariant, ...] = (*_token_select.AOT_VARIANTS, *_neighbors.AOT_VARIANTS)

__all__ = ["AOT_VARIANTS", "AotVariant", "neighbor_index", "neighbor_reconstruct", "token_select"]
