"""IPCV inside vLLM's own vision tower: a vLLM general plugin (``vllm.general_plugins``).

Installed with ipcv-deploy, it does nothing unless ``IPCV_VLLM_CONFIG`` is set in the
server's environment: then every vLLM process (API server, engine core, workers) replaces the
forward of vLLM's Qwen2-VL vision tower with IPCV on that tower's own weights, so a server
started with images (no ``--enable-mm-embeds``) prunes inside the ViT and restores every
token before the LLM. ``IPCV_VLLM_CONFIG`` is ``reference`` (the paper's Qwen2-VL setting:
K=3, keep 35%, AS 7 blocks, k=10) or a JSON object of ``IPCVConfig`` fields.

Risk: this overrides a vLLM internal (``Qwen2VisionTransformer.forward``), which vLLM may
change in any release, so the plugin refuses to load on vLLM versions it was not tested with
(``TESTED_VLLM``). It imports torch, vLLM and ipcv-deploy's compression core only (vLLM pins
its own transformers).
"""

from __future__ import annotations

import json
import os

from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.errors import ConfigError

__all__ = ["CONFIG_ENV", "TESTED_VLLM", "config_from_env", "register"]

#: The environment variable that turns the plugin on and holds its IPCV settings.
CONFIG_ENV = "IPCV_VLLM_CONFIG"
#: vLLM versions the tower override was tested with (tests/runtime/test_vllm.py).
TESTED_VLLM = ("0.32.0",)
#: The reference setting for the one family served in-engine.
REFERENCE = IPCVConfig(prune_layer=3, keep_ratio=0.35, as_layers=7, num_neighbors=10)


def config_from_env(value: str) -> IPCVConfig:
    """``IPCV_VLLM_CONFIG``'s settings: ``reference`` or a JSON object of IPCVConfig fields.

    Raises:
        ConfigError: not JSON, not an object, or a field out of range.
    """
    if value.strip() == "reference":
        return REFERENCE
    try:
        fields = json.loads(value)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{CONFIG_ENV}={value!r} is not JSON ({err.msg}); set it to 'reference' or e.g. "
            '\'{"prune_layer": 3, "keep_ratio": 0.35, "as_layers": 7}\''
        ) from None
    if not isinstance(fields, dict):
        raise ConfigError(f"{CONFIG_ENV} must be a JSON object of IPCV settings, got {value!r}")
    try:
        return IPCVConfig(**fields)
    except TypeError as err:
        raise ConfigError(f"{CONFIG_ENV}: {err}; the fields are those of IPCVConfig") from None


def register() -> None:
    """The plugin's entry point, called by vLLM in each of its processes.

    Raises:
        ConfigError: ``IPCV_VLLM_CONFIG`` is malformed, or vLLM is not a tested version.
    """
    value = os.environ.get(CONFIG_ENV)
    if not value:
        return
    config = config_from_env(value)
    import vllm

    if vllm.__version__ not in TESTED_VLLM:
        raise ConfigError(
            f"the ipcv vLLM plugin overrides a vLLM internal and is tested with vLLM "
            f"{', '.join(TESTED_VLLM)}, not {vllm.__version__}: install one of those or unset "
            f"{CONFIG_ENV}"
        )
    from ipcv_deploy.vllm_plugin.qwen2_vl import install

    install(config)
