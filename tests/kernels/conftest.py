"""Kernel tests: under Triton's interpreter (set in ``tests/conftest.py``) or, with
``TRITON_INTERPRET=0``, on CUDA."""

import pytest

pytest.importorskip("triton", reason="triton is not installed (an optional dependency)")


@pytest.fixture(autouse=True)
def kernel_backend() -> None:
    """Skip with neither the interpreter nor a CUDA device to run the kernels."""
    import torch
    import triton

    if not triton.knobs.runtime.interpret and not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 and no CUDA device: nothing runs the kernels")
