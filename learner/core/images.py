"""Image decoding shared by the data loaders (which cache decoded data sets) and the server
(which decodes posted images): one transform, so both see the same pixels."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError


def decode_image(data: bytes, size: int | None = None, channels: int = 3) -> np.ndarray:
    """Decode image bytes into a ``(channels, H, W)`` uint8 array.

    With ``size``, the shorter side is resized to ``size`` (bilinear) and the centre
    ``size`` x ``size`` square is cut out, the ImageNet rule (torchvision's ``Resize(size)`` then
    ``CenterCrop(size)``). Raises ``ValueError`` for bytes that are not a decodable image.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive number of pixels, not {size}")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"image data must be bytes, not {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("image data is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            # load() inside the try: a truncated file only fails when its pixels are read.
            img.load()
            img = img.convert("RGB" if channels == 3 else "L")
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a decodable image ({len(data)} bytes): {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL reports truncated or corrupt streams with these.
        raise ValueError(f"corrupt or truncated image ({len(data)} bytes): {exc}") from exc
    if size is not None:
        img = _resize_center_crop(img, size)
    array = np.asarray(img, dtype=np.uint8)
    if channels == 1:
        return np.ascontiguousarray(array[None])
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    width, height = img.size
    # Rounding as in torchvision (int() for the long side, round() for the crop offset), so
    # cached images match what its ImageNet transforms would produce.
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    if (left, top, new_w, new_h) == (0, 0, size, size):
        return img
    return img.crop((left, top, left + size, top + size))
