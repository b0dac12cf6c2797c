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


# A model that trains on random crops without padding (the ImageNet recipe: 224 of 256) keeps
# its training images at this multiple of the crop, as torchvision's Resize(256) does.
_UNPADDED_STORE_RATIO = 256 / 224


def training_side(crop: int, pad: int) -> int:
    """The side of a stored training image for a model that takes ``crop`` x ``crop`` inputs
    and trains on random crops after ``pad`` pixels of zero padding.

    One rule for the data loaders (learner/data.py), the offline runner that reads them and
    the server's learn routes, so an image posted over HTTP is stored exactly as the offline
    runner would have it (replay equals offline). A padded recipe (CIFAR: crop 32, pad 4)
    crops within the padding, so images are stored at the crop size; an unpadded one
    (ImageNet: crop 224, pad 0) crops within a larger image, stored at 256 (crop * 256/224).
    """
    if crop < 1 or pad < 0:
        raise ValueError(f"crop must be positive and pad not negative, got {crop}, {pad}")
    return crop if pad > 0 else int(round(crop * _UNPADDED_STORE_RATIO))


def to_training_input(data: bytes, crop: int, pad: int, channels: int = 3) -> np.ndarray:
    """Image bytes of any size as the ``(channels, S, S)`` uint8 array a model of ``crop``
    and ``pad`` stores for training, S = `training_side`: the shorter side resized to S
    (bilinear), then the centre S x S square. An image already S x S is left untouched
    (byte-identical pixels), so exact-size posts store what they always stored."""
    return decode_image(data, size=training_side(crop, pad), channels=channels)


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
