"""Images of a request: ``data:`` URLs, or ``http(s)://`` URLs when fetching is allowed.

Nothing is fetched by default (a server that fetches any URL a client names can be made to
probe its own network); with ``--allow-url-fetch`` only http(s), with a timeout and a size
limit. Every image is size-checked before it is decoded, and PIL's decompression-bomb guard
stays on.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from ipcv_deploy.serve.protocol import ApiError, ImagePart, ServerLimits

__all__ = ["load_request_image"]


def _too_large(part: ImagePart, what: str) -> ApiError:
    return ApiError(413, f"the image at {part.param} is too large: {what}", part.param)


def _decode_data_url(part: ImagePart, limits: ServerLimits) -> bytes:
    header, sep, payload = part.url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ApiError(
            400, "an image data URL must look like data:image/png;base64,<data>", part.param
        )
    if len(payload) > 4 * (limits.max_image_bytes // 3 + 1):
        raise _too_large(part, f"more than {limits.max_image_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the image data URL is not valid base64", part.param) from None


def _fetch(part: ImagePart, limits: ServerLimits) -> bytes:
    import httpx

    try:
        with httpx.stream(
            "GET", part.url, timeout=limits.fetch_timeout_s, follow_redirects=False
        ) as response:
            if response.status_code != 200:
                raise ApiError(
                    400, f"fetching the image gave HTTP {response.status_code}", part.param
                )
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > limits.max_image_bytes:
                    raise _too_large(part, f"more than {limits.max_image_bytes} bytes")
            return bytes(data)
    except httpx.HTTPError as err:
        raise ApiError(400, f"could not fetch the image: {err}", part.param) from None


def load_request_image(part: ImagePart, limits: ServerLimits) -> Image.Image:
    """The RGB image of an ``image_url`` part.

    Raises:
        ApiError: a URL scheme not allowed, undecodable data, or an image over the limits.
    """
    scheme = part.url.split(":", 1)[0].lower()
    if scheme == "data":
        raw = _decode_data_url(part, limits)
    elif scheme in ("http", "https") and limits.allow_url_fetch:
        raw = _fetch(part, limits)
    else:
        allowed = "data: URLs" + (" and http(s) URLs" if limits.allow_url_fetch else "")
        hint = "" if limits.allow_url_fetch else " (start the server with --allow-url-fetch)"
        raise ApiError(
            400, f"image URLs with scheme {scheme!r} are not fetched; send {allowed}{hint}",
            part.param,
        )  # fmt: skip
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise _too_large(part, f"{width}x{height} > {limits.max_image_pixels} pixels")
            return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large(part, "PIL refuses it as a decompression bomb") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ApiError(400, f"the image does not decode: {reason}", part.param) from None
