"""JPEG decoding that decodes only what is needed (Pillow): the pixels of one crop, at the scale it is used.

Two savings, both exact up to JPEG/resampling rounding:

- **DCT-domain downscaling.** ``Image.draft`` asks libjpeg to decode at 1/2, 1/4 or 1/8 of the stored size,
  skipping most of the inverse DCT. Pillow picks the largest factor that keeps both sides at least the size
  we ask for, so it only acts when the target is at most half the stored size (typical ImageNet photos,
  ≈500×375, never qualify for a 256–480 shorter side; multi-megapixel ones do). ``draft=False`` turns it off.
- **Resample only the crop.** ``Image.resize(..., box=...)`` computes just the output pixels of a source
  rectangle, with the filter support clamped to the *image* (not the box) borders, so "resize the whole image
  to shorter side S, then crop 224×224" equals "resize the matching box straight to 224×224" while computing
  224² instead of up to 480×640 output pixels.

The filter is bilinear by default, with Pillow's antialiasing (its support widens by the downscale factor, so
downscaling averages every source pixel instead of aliasing). Bilinear because it is what torchvision/timm
evaluate imported ResNet weights with (a 224 crop of a 256 resize, bilinear) and it costs about half of
bicubic's 4×4 taps; ``resample="bicubic"`` gives fb.resnet.torch's choice. The decoder itself is libjpeg-turbo
inside Pillow; other formats (ImageNet has a few PNG/CMYK files named .JPEG) decode the same way, without draft.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

# (left, top, right, bottom) in pixels of the stored image; floats: a crop of a resized image maps back to
# fractional source coordinates.
Box = tuple[float, float, float, float]

RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def open_image(data: bytes) -> Image.Image:
    """Opens encoded bytes lazily: only the header is parsed, so ``.size`` is cheap and nothing is decoded."""
    return Image.open(io.BytesIO(data))


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of the stored image, from its header."""
    return open_image(data).size


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) after resizing so that the shorter side is exactly ``short_side`` (aspect kept, the
    longer side rounded)."""
    if width <= height:
        return short_side, max(short_side, round(height * short_side / width))
    return max(short_side, round(width * short_side / height)), short_side


def _draft(im: Image.Image, need: tuple[int, int]) -> float:
    """Asks the decoder for a reduced scale that still has at least ``need`` pixels per side; returns the
    factor by which stored-pixel coordinates shrink (1.0 if the decoder did not reduce)."""
    width = im.size[0]
    reply = im.draft("RGB", (max(1, need[0]), max(1, need[1])))
    if reply is None:  # not a JPEG, or already configured
        return 1.0
    # Pillow reports the stored extent in the new pixels: (0, 0, W / s, H / s); s is 1, 2, 4 or 8. The new
    # size is ceil(W / s), so coordinates map by exactly 1 / s (libjpeg's scaled pixel j covers [j*s, (j+1)*s)).
    return width / reply[1][2]


def decode_box(
    data: bytes,
    box: Box,
    out_size: tuple[int, int],
    *,
    mirror: bool = False,
    draft: bool = True,
    resample: str = "bilinear",
) -> np.ndarray:
    """Decodes the ``box`` of the stored image resampled to ``out_size`` = (width, height), mirrored
    left-right if ``mirror`` (done here because Pillow mirrors its 4-byte pixels several times faster than
    numpy copies a reversed 3-channel view).

    Returns:
      uint8 (height, width, 3) RGB.
    """
    im = open_image(data)
    width, height = im.size
    left, top, right, bottom = box
    if not (0 <= left < right <= width and 0 <= top < bottom <= height):
        raise ValueError(f"box {box} is not inside the {width}x{height} image")
    if draft:
        # The whole image at the scale the box is resampled to: the decoder may go down to it, not below.
        need = (math.ceil(width * out_size[0] / (right - left)), math.ceil(height * out_size[1] / (bottom - top)))
        s = _draft(im, need)
        if s != 1.0:
            box = (left / s, top / s, right / s, bottom / s)
    out = im.resize(out_size, RESAMPLE[resample], box=box)
    if mirror:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if out.mode != "RGB":  # greyscale and CMYK JPEGs: converting the small output is cheaper than the input
        out = out.convert("RGB")
    return np.asarray(out)


def decode_resized(data: bytes, short_side: int, *, draft: bool = True, resample: str = "bilinear") -> np.ndarray:
    """Decodes the whole image resized so that its shorter side is ``short_side`` (uint8 HWC RGB).

    With ``draft`` the decoder downscales in the DCT domain first when ``short_side`` is at most half the
    stored shorter side; the exact resize to ``short_side`` follows either way.
    """
    width, height = image_size(data)
    return decode_box(data, (0, 0, width, height), resized_size(width, height, short_side),
                      draft=draft, resample=resample)
