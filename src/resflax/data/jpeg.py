"""Image decoding (Pillow, libjpeg-turbo inside it): evaluation crops pixel-identical to the pipeline the weights'
authors used, training crops that decode only what they need.

**Evaluation** (``decode_resized``, then integer crops in ``data.imagenet``) is torchvision's ``Resize(S)`` +
``CenterCrop`` on a PIL image, as its reference scripts and timm evaluate (``Image.open(f).convert("RGB")``
first): the full decode (no DCT-domain shortcut), any mode (palette, 16-bit, LA, CMYK, ...) converted to RGB
*before* resizing, the shorter side resized to exactly S and the longer one to ``int(S * long / short)``
(truncated: torchvision's rule, also fb.resnet.torch's), with Pillow's antialiased filter (``Image.resize``
without ``reducing_gap``, as torchvision calls it: downscaling widens the filter's support by the downscale
factor, so every source pixel is averaged). tests/test_preprocess_exact.py checks identical pixels against the
real torchvision and timm transforms. Greyscale (``L``) is the one mode resized before it becomes RGB: the
three equal channels are the same filter on the same values, so the pixels are identical. The price, measured
on one core: 114 instead of 128 eval crops/s on 500×375 JPEGs (the whole image resized, not just the crop),
18 instead of 72 on 1200-1800 px ones (no DCT-domain shortcut).

**Training** (``decode_box``) computes only the crop: ``Image.resize(..., box=...)`` resamples a source
rectangle straight to the output size (the filter's support clamped to the *image* borders), equal to "resize
the whole image, then crop" up to float rounding of the box coordinates (at most 1/255 on a few pixels). With
``draft=True`` libjpeg may first decode at 1/2, 1/4 or 1/8 scale (``Image.draft``, skipping most of the
inverse DCT), but never below twice the scale the box is resampled to: the last factor of two or more is always
Pillow's antialiased resize. Measured against the full decode on 120 paper-style crops (shorter side
256-480) of six 512-2400 px photos, 34 of which drafted: 0.21/255 on average, at most 6/255 (0.4% of values
differ by more than 1/255); the old rule (draft down to the crop's own scale) gave 0.53/255 on average and up to
39/255 (tests/test_imagenet_data.py keeps it under 0.5/255). On 1200-2400 px photos this decodes 39 crops/s on
one core, against 66 with the old rule and 30 without drafting. Typical ImageNet photos (≈500×375) never
qualify for a 224 crop of a 256-480 shorter side; multi-megapixel ones do.

The filter is a setting (``RESAMPLE``): bilinear is what torchvision evaluates its weights with (and half of
bicubic's taps); bicubic is timm's usual choice and fb.resnet.torch's.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from resflax import configs

# (left, top, right, bottom) in pixels of the stored image; floats: a crop of a resized image maps back to
# fractional source coordinates.
Box = tuple[float, float, float, float]

# Pillow's filters by the names torchvision's InterpolationMode and timm's configs use (the config key's choices)
RESAMPLE = {name: Image.Resampling[name.upper()] for name in configs.KEYS["resample"].choices}


def open_image(data: bytes) -> Image.Image:
    """Opens encoded bytes lazily: only the header is parsed, so ``.size`` is cheap and nothing is decoded."""
    return Image.open(io.BytesIO(data))


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of the stored image, from its header."""
    return open_image(data).size


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) after resizing so that the shorter side is exactly ``short_side``: the longer side is
    ``int(short_side * long / short)``, truncated, as torchvision's ``Resize(short_side)`` computes it (and
    fb.resnet.torch's ``Scale``)."""
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def _rgb(im: Image.Image) -> Image.Image:
    """``im`` as RGB, converted before any resizing (a palette resized is nearest-neighbour, 16-bit and
    alpha modes resize differently); greyscale stays ``L`` until after: the same pixels, a third of the work."""
    return im if im.mode in ("RGB", "L") else im.convert("RGB")


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
    draft: bool = False,
    resample: str = "bilinear",
) -> np.ndarray:
    """Decodes the ``box`` of the stored image resampled to ``out_size`` = (width, height), mirrored
    left-right if ``mirror`` (done here because Pillow mirrors its 4-byte pixels several times faster than
    numpy copies a reversed 3-channel view). ``draft``: let libjpeg decode at a reduced scale no smaller than
    twice the output's (training only; see the module docstring).

    Returns:
      uint8 (height, width, 3) RGB.
    """
    im = open_image(data)
    width, height = im.size
    left, top, right, bottom = box
    if not (0 <= left < right <= width and 0 <= top < bottom <= height):
        raise ValueError(f"box {box} is not inside the {width}x{height} image")
    if draft:
        # The whole image at twice the scale the box is resampled to: the decoder may go down to it, not below,
        # so Pillow's antialiased resize always does the last reduction (by a factor of 2 or more).
        need = (math.ceil(2 * width * out_size[0] / (right - left)),
                math.ceil(2 * height * out_size[1] / (bottom - top)))
        s = _draft(im, need)
        if s != 1.0:
            box = (left / s, top / s, right / s, bottom / s)
    out = _rgb(im).resize(out_size, RESAMPLE[resample], box=box)
    if mirror:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if out.mode != "RGB":  # greyscale
        out = out.convert("RGB")
    return np.asarray(out)


def decode_resized(data: bytes, short_side: int, *, resample: str = "bilinear") -> np.ndarray:
    """The whole image, fully decoded, resized so that its shorter side is ``short_side``: torchvision's
    ``Resize(short_side)`` on ``Image.open(f).convert("RGB")``, pixel for pixel (uint8 HWC RGB)."""
    width, height = image_size(data)
    return decode_box(data, (0, 0, width, height), resized_size(width, height, short_side), resample=resample)
