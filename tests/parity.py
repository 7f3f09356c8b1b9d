"""Test assertions on ``ipcv_deploy.parity.compare``: fp32 means ~1e-5 relative error."""

from __future__ import annotations

import torch

from ipcv_deploy.parity import compare

FP32_RTOL = 1e-5


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = FP32_RTOL, what: str = "output"
) -> None:
    """Max abs error relative to the largest expected magnitude must be <= ``rtol``."""
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    agreement = compare(expected, actual)
    assert agreement.max_rel <= rtol, f"{what}: {agreement} (rtol {rtol:g})"


def assert_same_indices(
    actual: torch.Tensor, expected: torch.Tensor, what: str = "indices"
) -> None:
    """Index outputs must be identical."""
    assert actual.dtype == torch.int64, f"{what}: dtype {actual.dtype}, want int64"
    assert torch.equal(actual, expected), (
        f"{what}: differ at {(actual != expected).nonzero()[:5].tolist()}"
    )
