"""Images and videos for the runtime: paths or PIL images, decoded safely (no torch needed)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageSequence, UnidentifiedImageError

from ipcv_deploy.errors import InputError

__all__ = [
    "MAX_VIDEO_FRAMES",
    "ImageInput",
    "PromptImages",
    "VideoInput",
    "image_list",
    "load_image",
    "load_video",
]

ImageInput = str | os.PathLike[str] | Image.Image
#: The images of one prompt: one, or several in the order the prompt places them.
PromptImages = ImageInput | Sequence[ImageInput]
#: A video: its frames in order, a folder of frame images (in name order) or an animated image
#: file (GIF, APNG, WebP).
VideoInput = str | os.PathLike[str] | Sequence[ImageInput]
#: Most frames one video may have (Qwen2-VL's video processor samples at most 768).
MAX_VIDEO_FRAMES = 768
_FRAME_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def image_list(images: PromptImages, allow_none: bool = False) -> list[ImageInput]:
    """The images of one prompt as a list (a lone image is a list of one).

    Raises:
        InputError: an empty list, unless ``allow_none`` (the prompt has a video).
    """
    found = list(images) if isinstance(images, (list, tuple)) else [images]
    if not found and not allow_none:
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


def load_video(video: VideoInput) -> list[Image.Image]:
    """The RGB frames of a video, all of one size.

    Raises:
        InputError: the folder or file is missing, holds no frames or more than
            ``MAX_VIDEO_FRAMES``, a frame does not decode, or frames differ in size.
    """
    if isinstance(video, (list, tuple)):
        frames = [load_image(frame) for frame in video]
        where = "the video"
    else:
        path = Path(video)
        where = str(path)
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.suffix.lower() in _FRAME_SUFFIXES)
            frames = [load_image(f) for f in files[: MAX_VIDEO_FRAMES + 1]]
        elif path.is_file():
            frames = _animation_frames(path)
        else:
            raise InputError(
                f"video not found: {path}; pass a folder of frame images or an animated "
                "GIF / PNG / WebP file"
            )
    if not frames:
        raise InputError(f"{where} holds no frames; pass a folder of frame images")
    if len(frames) > MAX_VIDEO_FRAMES:
        raise InputError(f"{where} has over {MAX_VIDEO_FRAMES} frames; sample the frames first")
    sizes = {frame.size for frame in frames}
    if len(sizes) > 1:
        found = ", ".join(f"{w}x{h}" for w, h in sorted(sizes))
        raise InputError(f"the frames of {where} differ in size ({found}); resize them to one")
    return frames


def _animation_frames(path: Path) -> list[Image.Image]:
    """The frames of an animated image file (a still image is one frame)."""
    frames = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                for frame in ImageSequence.Iterator(opened):
                    frames.append(frame.convert("RGB"))
                    if len(frames) > MAX_VIDEO_FRAMES:
                        break
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InputError(
            f"video {path} is too large to decode safely ({str(err).splitlines()[0]})"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InputError(
            f"cannot read video {path}: {str(err).splitlines()[0]}; pass a folder of frame "
            "images or an animated GIF / PNG / WebP file"
        ) from None
    return frames
