"""IPCVConfig validation: every bad value gets a one-line error naming it and the fix."""

from __future__ import annotations

import pytest

from ipcv_deploy import ConfigError, IPCVConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_ratio": 0.0}, r"keep_ratio must be in \(0, 1\], got 0.0; pass the fraction"),
        ({"keep_ratio": 1.5}, r"keep_ratio must be in \(0, 1\], got 1.5"),
        ({"keep_ratio": float("nan")}, r"keep_ratio must be in \(0, 1\], got nan"),
        ({"keep_ratio": "0.3"}, "keep_ratio must be a number"),
        ({"prune_layer": 1}, r"prune_layer \(K\) must be >= 2, got 1"),
        ({"prune_layer": 2.5}, "prune_layer must be an integer"),
        ({"as_layers": -1}, "as_layers must be >= 0, got -1; pass 0 to turn"),
        ({"num_neighbors": 0}, r"num_neighbors \(k\) must be >= 1, got 0"),
        ({"selection": "tile"}, "selection must be one of per_image, global, got 'tile'"),
    ],
)
def test_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        IPCVConfig(**kwargs)


def test_errors_are_value_errors_and_one_line():
    with pytest.raises(ValueError) as info:
        IPCVConfig(keep_ratio=2)
    assert "\n" not in str(info.value)


def test_reduction_is_accepted():
    config = IPCVConfig.from_reduction(0.65, prune_layer=7)
    assert config.keep_ratio == pytest.approx(0.35)
    assert config.reduction == pytest.approx(0.65)
    assert config.prune_layer == 7
    with pytest.raises(ConfigError, match=r"reduction must be in \[0, 1\), got 1.0"):
        IPCVConfig.from_reduction(1.0)


def test_kept_count_matches_the_reference_formulas():
    config = IPCVConfig(keep_ratio=0.35)
    assert config.kept_count(1024) == int(1024 * 0.35)
    assert config.kept_count(1025, num_prefix=1) == 1 + int(1024 * 0.35)  # InternVL: CLS + patches
    assert IPCVConfig(keep_ratio=0.001).kept_count(100) == 1
    assert IPCVConfig(keep_ratio=1.0).kept_count(65, num_prefix=1) == 65


def test_check_depth():
    IPCVConfig(prune_layer=31, as_layers=1).check_depth(32)
    with pytest.raises(ConfigError, match=r"pick K in \[2, 31\]"):
        IPCVConfig(prune_layer=32).check_depth(32)
    IPCVConfig(prune_layer=3, as_layers=29).check_depth(32)  # every block after K
    with pytest.raises(ConfigError, match=r"as_layers=30 runs past .*at most 29"):
        IPCVConfig(prune_layer=3, as_layers=30).check_depth(32)


def test_check_neighbors():
    IPCVConfig(num_neighbors=10).check_neighbors(10)
    with pytest.raises(ConfigError, match=r"k\) = 11 exceeds the 10 tokens kept per image"):
        IPCVConfig(num_neighbors=11).check_neighbors(10)


def test_dict_round_trip_and_unknown_keys():
    config = IPCVConfig(prune_layer=7, keep_ratio=0.25, as_layers=3, selection="global")
    assert IPCVConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown IPCV setting"):
        IPCVConfig.from_dict({**config.to_dict(), "top_k": 5})
