"""Images for the runtime: a path or a PIL image, decoded safely (no torch needed)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ipcv_deploy.errors import InputError

__all__ = ["ImageInput", "PromptImages", "image_list", "load_image"]

ImageInput = str | os.PathLike[str] | Image.Image
#: The images of one prompt: one, or several in the order the prompt places them.
PromptImages = ImageInput | Sequence[ImageInput]


def image_list(images: PromptImages) -> list[ImageInput]:
    """The images of one prompt as a list (a lone image is a list of one).

    Raises:
        InputError: an empty list.
    """
    found = list(images) if isinstance(images, (list, tuple)) else [images]
    if not found:
        raise InputError("a prompt needs at least one image; pass --image FILE")
    return found


def load_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a path (or an image already opened).

    Raises:
        InputError: the file is missing or is not an image PIL can read.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise InputError(f"image not found: {path}; pass an existing image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                return opened.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InputError(
            f"image {path} is too large to decode safely ({str(err).splitlines()[0]}); "
            "downscale it first"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InputError(
            f"cannot read image {path}: {str(err).splitlines()[0]}; pass a PNG/JPEG/... file"
        ) from None
