"""Turning posted bytes into the uint8 (C, H, W) arrays the model takes, or a clear refusal.

Policy (documented in server/README.md):

- Formats: PNG, JPEG, WebP, BMP and GIF (first frame). Anything else is refused before its
  pixels are decoded, which also keeps PIL's rarer decoders away from untrusted input.
- Size: an image over ``max_pixels`` (width x height, read from the header before decoding)
  is refused with 413, so a small compressed file cannot inflate into gigabytes.
- Modes converted (lossless or standard conversions): 1, L, LA, P, PA, RGB, RGBA, RGBX ->
  RGB by replication / palette lookup / dropping alpha, or -> L (ITU-R 601-2 luma) for a
  one-channel model. Alpha is dropped, not composited, as the learner's data loaders do.
- Modes refused: CMYK (no colour management here, colours would come out wrong), 16- and
  32-bit integer or float images (I;16*, I, F: PIL would clip them to 8 bits, not scale
  them), and other colour spaces (YCbCr, LAB, HSV).
- Geometry: an image of another size is resized (shorter side, bilinear) and
  centre-cropped: to the model's input size for prediction, the usual evaluation transform;
  to the stored training size for learning (the service passes that shape,
  `learner.core.images.training_side`), the transform the data loaders apply, so the offline
  runner and HTTP store the same pixels. ``exact_size`` refuses another size instead.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from learner.core.images import decode_image

ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
CONVERTIBLE_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX"})
_DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+;base64,", re.IGNORECASE)


class ImageInputError(ValueError):
    """A posted image that cannot be used; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def b64decode(text: str, what: str) -> bytes:
    """Standard base64 (padding required, whitespace ignored), optionally as a data URL."""
    if not isinstance(text, str):
        raise ImageInputError(f"{what} must be a base64 string, got {type(text).__name__}")
    body = _DATA_URL.sub("", text.strip(), count=1)
    body = "".join(body.split())
    if not body:
        raise ImageInputError(f"{what} is empty")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageInputError(f"{what} is not valid base64: {e}") from None


def inspect_image(data: bytes, what: str, max_pixels: int) -> tuple[str, str, int, int]:
    """Format, mode, width and height from the header, after the format/mode/size checks."""
    if not data:
        raise ImageInputError(f"{what} is empty")
    try:
        with warnings.catch_warnings():
            # PIL warns (rather than raises) between its own limit and twice it; ours is lower.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
                fmt, mode, (width, height) = img.format or "?", img.mode, img.size
    except UnidentifiedImageError:
        raise ImageInputError(
            f"{what} is not an image in a supported format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except Image.DecompressionBombError as e:
        raise ImageInputError(f"{what} is too large: {e}", status=413) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageInputError(f"{what} is corrupt: {e}") from None
    if width * height > max_pixels:
        raise ImageInputError(
            f"{what} is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
            status=413,
        )
    if mode not in CONVERTIBLE_MODES:
        raise ImageInputError(
            f"{what} has image mode {mode!r}, which is not converted here; send 8-bit "
            "grayscale, RGB(A) or palette images (convert CMYK and 16-bit images first)"
        )
    return fmt, mode, width, height


def decode_for_model(
    data: bytes,
    chw: Sequence[int],
    *,
    what: str,
    max_pixels: int,
    exact_size: bool,
) -> np.ndarray:
    """``data`` as a uint8 (C, H, W) array for a model taking ``chw`` (H == W).

    ``exact_size``: refuse an image of another size instead of resizing it (learning).
    """
    channels, height, width = (int(x) for x in chw)
    if channels not in (1, 3):
        raise ValueError(f"models with {channels} input channels are not supported")
    _, _, w, h = inspect_image(data, what, max_pixels)
    if exact_size and (w, h) != (width, height):
        raise ImageInputError(
            f"{what} is {w}x{h} pixels; images to learn from must be exactly "
            f"{width}x{height} (width x height) for this model"
        )
    resize = None if (w, h) == (width, height) else height
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            out = decode_image(bytes(data), size=resize, channels=channels)
    except ValueError as e:
        raise ImageInputError(f"{what}: {e}") from None
    if out.shape != (channels, height, width):
        # decode_image's crop is square; a non-square model input is not something we serve.
        raise ImageInputError(f"{what} decoded to shape {out.shape}, expected {tuple(chw)}")
    return out


def decode_batch(
    blobs: Sequence[bytes],
    chw: Sequence[int],
    *,
    max_pixels: int,
    exact_size: bool,
    names: Sequence[str] | None = None,
) -> np.ndarray:
    """Decode every image (first failure raises, naming the image); uint8 (N, C, H, W)."""
    out = np.empty((len(blobs), *chw), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        what = f"image {i}" + (f" ({names[i]!r})" if names and names[i] else "")
        out[i] = decode_for_model(
            blob, chw, what=what, max_pixels=max_pixels, exact_size=exact_size
        )
    return out
