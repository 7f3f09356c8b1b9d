"""Architecture rules that can be checked: family names only in models/, light imports."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import onnx

PACKAGE = Path(__file__).resolve().parents[1] / "ipcv_deploy"
FAMILY = re.compile(r"qwen|intern|clip|siglip|llava|gemma", re.I)
#: transformers internals the package may touch only in ``hf_compat.py``.
PRIVATE_TRANSFORMERS = (
    "_prepare_position_ids_for_generation",
    "_attn_implementation",
    "AttentionInterface",
    "AttentionMaskInterface",
    "sdpa_attention_forward",
    "check_argument_for_proper_class",
    "image_processing_backends",
    "past_key_values",
)


def _code_words(path: Path) -> list[str]:
    """Names, attributes and string constants of a module, docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    words = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.append(node.id)
        elif isinstance(node, ast.Attribute):
            words.append(node.attr)
        elif isinstance(node, ast.alias):
            words.append(node.name)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            words.append(node.value)
    return words


def _family_word(word: str) -> bool:
    """A family name, and not an ONNX operator that happens to contain one (``Clip``)."""
    return bool(FAMILY.search(word)) and not onnx.defs.has(word)


#: Where family names belong: our adapters of transformers' classes, and of vLLM's (the plugin).
FAMILY_HOMES = ("models", "vllm_plugin")


def test_nothing_family_specific_outside_models():
    offenders = {
        str(path.relative_to(PACKAGE)): hits
        for path in PACKAGE.rglob("*.py")
        if not set(FAMILY_HOMES) & set(path.relative_to(PACKAGE).parts)
        and (hits := sorted({w for w in _code_words(path) if _family_word(w)}))
    }
    assert not offenders, offenders


def test_family_words_include_paligemma():
    assert _family_word("PaliGemmaConfig") and _family_word("gemma")


def test_private_transformers_apis_only_in_hf_compat():
    offenders = {
        str(path.relative_to(PACKAGE)): hits
        for path in PACKAGE.rglob("*.py")
        if path.name != "hf_compat.py"
        and (hits := sorted({w for w in _code_words(path) if w in PRIVATE_TRANSFORMERS}))
    }
    assert not offenders, offenders


def test_compression_and_vllm_plugin_do_not_import_models_or_transformers():
    """The plugin runs under vLLM's own transformers: it may use the compression core only."""
    for path in [
        *(PACKAGE / "compression").rglob("*.py"),
        *(PACKAGE / "vllm_plugin").rglob("*.py"),
    ]:
        words = _code_words(path)
        assert not any(w.startswith(("ipcv_deploy.models", "transformers")) for w in words), path


def test_package_and_cli_help_import_without_onnx_or_tensorrt():
    code = (
        "import sys, ipcv_deploy, ipcv_deploy.cli; "
        "assert not {'tensorrt', 'onnxruntime', 'onnx'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
