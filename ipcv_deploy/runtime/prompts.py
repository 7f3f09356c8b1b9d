"""The image-placeholder rules of a prompt, shared by every LLM backend (no torch needed)."""

from __future__ import annotations

from ipcv_deploy.errors import InputError

__all__ = ["check_placeholders"]


def check_placeholders(prompt: str, placeholder: str, raw: bool, images: int = 1) -> None:
    """A raw prompt holds the placeholder once per image; a templated one not at all.

    Raises:
        InputError: naming the count and the fix.
    """
    count = prompt.count(placeholder)
    if raw and count != images:
        needs = "exactly one" if images == 1 else f"one per image ({images})"
        raise InputError(
            f"the prompt has {count} image placeholders {placeholder!r}; a raw prompt "
            f"needs {needs} (or leave out --raw-prompt to use the chat template)"
        )
    if not raw and count:
        raise InputError(
            f"the prompt contains the image placeholder {placeholder!r}; the chat "
            "template adds it: remove it, or pass --raw-prompt to use the prompt as is"
        )
