"""FLOPs report: dense vs IPCV (kept-query form) vs the reference code's form."""

from __future__ import annotations

from typing import Any

from ipcv_deploy.compression.cost import encoder_flops
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.models import FamilyAdapter, ImageSize

__all__ = ["FLOPS_HEADERS", "flops_report", "flops_table"]


def flops_report(
    adapter: FamilyAdapter, image_size: ImageSize, config: IPCVConfig
) -> dict[str, Any]:
    """FLOPs per image of the tower, dense and with IPCV in both AS forms.

    Returns:
        A JSON-ready dict: the encoder shape, each variant's breakdown, and shares of dense.
    """
    shape = adapter.encoder_shape(image_size)
    dense = encoder_flops(shape)
    variants = {
        "dense": dense,
        "ipcv": encoder_flops(shape, config, "kept_query"),
        "ipcv_reference_form": encoder_flops(shape, config, "full_query"),
    }
    return {
        "image_size": list(image_size),
        "tokens_per_image": shape.tokens,
        "kept_per_image": config.kept_count(shape.tokens, shape.num_prefix),
        "ipcv": config.to_dict(),
        "flops": {name: v.to_dict() for name, v in variants.items()},
        "share_of_dense": {
            name: {"blocks": v.blocks / dense.blocks, "total": v.total / dense.total}
            for name, v in variants.items()
        },
    }


def flops_table(report: dict[str, Any]) -> list[list[str]]:
    """Rows (variant, GFLOPs of linear / attention / ipcv ops / total, share) for printing."""
    rows = []
    labels = {
        "dense": "dense",
        "ipcv": "IPCV (kept-query AS)",
        "ipcv_reference_form": "IPCV (reference-code AS)",
    }
    for name, label in labels.items():
        f = report["flops"][name]
        share = report["share_of_dense"][name]
        rows.append(
            [
                label,
                f"{f['linear'] / 1e9:.1f}",
                f"{f['attention'] / 1e9:.1f}",
                f"{f['ipcv_ops'] / 1e9:.2f}",
                f"{f['total'] / 1e9:.1f}",
                f"{share['blocks'] * 100:.1f}%",
                f"{share['total'] * 100:.1f}%",
            ]
        )
    return rows


FLOPS_HEADERS = [
    "variant",
    "linear GF",
    "attn GF",
    "ipcv ops GF",
    "total GF",
    "blocks %",
    "total %",
]
