"""ImageNet preprocessing on the host (numpy + Pillow): the paper's training augmentation and the eval crop.

Training (He et al. 2015 §3.4, after Krizhevsky et al.): shorter side resized to ``S`` drawn uniformly from
the integers in [256, 480]; a random 224×224 crop; a horizontal flip with probability 1/2; the per-pixel mean
subtracted; AlexNet's PCA colour ("lighting") noise. ``crop="inception"`` swaps the first two for the
random-resized crop of modern recipes (area (0.08, 1), aspect (3/4, 4/3)); it is a setting, not the default.
Eval: shorter side 256, the centre 224×224 crop, the same mean; decoded and resized exactly as torchvision's
``Resize(256)`` + ``CenterCrop(224)`` (``data.jpeg``), so imported weights see their authors' pixels
(``eval_resize``, ``size`` and ``resample`` give timm's settings: e.g. bicubic, 235 -> 224 for crop_pct 0.95).

**Output**: the model's input is float32 NHWC RGB in units of [0, 1] pixels, ``pixels / 255 - mean +
lighting``. The host does the expensive part, ``train_crop``/``eval_crop``: a uint8 (224, 224, 3) crop, already
mirrored, plus the image's lighting offset (3 floats; it cannot be folded into uint8 pixels without rounding
and clipping). ``finish_batch`` turns a batch of those into the float input with any array module: ``jnp``
inside the jitted step (as CIFAR's ``augment.normalize``), or numpy. Shipping uint8 is measured, not taste:
float32 batches are 4× the bytes, and moving them out of worker processes cut per-core throughput by ~35%
(benchmarks/input_throughput.py). ``train_example``/``eval_example`` compose the same on the host (float32).

**Randomness** is a function of (seed, epoch, example index) only: ``example_rng`` seeds a fresh generator
from those three numbers, so an image's augmentation does not depend on which process or worker computes it,
nor in what order. The draws happen in a fixed order (crop, flip, lighting), all of them even when a step is
switched off, so switching one off never changes the others.

**Mean**: "per-pixel mean" is a (224, 224, 3) image, the average of the eval crops (256 resize, centre 224)
of ``num_images`` training images spread evenly over the split, in [0, 1] units. ``load_or_compute_mean``
computes it once and caches it as ``.npy`` at an explicit path (``mean_cache_path`` keys the name by dataset,
version, sample size and resize settings). The documented fallback is the standard per-channel mean
``CHANNEL_MEAN`` (shape (3,), broadcast), which needs no pass over the data.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from resflax.data import jpeg
from resflax.data.files import save_atomically
from resflax.errors import DataError

NUM_CLASSES = 1000
IMAGE_SIZE = 224
TRAIN_SCALE = (256, 480)  # shorter side, inclusive
EVAL_RESIZE = 256
# RGB, [0, 1] units (torchvision/timm); the fallback for the per-pixel mean.
CHANNEL_MEAN = (0.485, 0.456, 0.406)
# AlexNet PCA lighting as fb.resnet.torch applies it to RGB in [0, 1]: eigenvectors are the *columns*.
EIGVAL = np.array([0.2175, 0.0188, 0.0045])
EIGVEC = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])
LIGHTING_STD = 0.1

AUGMENT_TAG = 0  # first word of the augmentation seeds; the epoch permutation uses sharding.PERMUTATION_TAG


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Preprocessing settings; the defaults are the paper's."""

    crop: str = "scale"  # "scale" (the paper's) or "inception" (random-resized crop)
    scale_range: tuple[int, int] = TRAIN_SCALE
    area_range: tuple[float, float] = (0.08, 1.0)  # inception only
    ratio_range: tuple[float, float] = (3 / 4, 4 / 3)  # inception only
    size: int = IMAGE_SIZE
    eval_resize: int = EVAL_RESIZE
    flip: bool = True
    lighting_std: float = LIGHTING_STD  # 0 turns lighting off
    draft: bool = True  # training crops: DCT-domain downscaling to >= 2x the crop's scale (jpeg.py); eval: never
    resample: str = "bilinear"  # jpeg.RESAMPLE: "bicubic" (timm), ...

    def __post_init__(self):
        if self.crop not in ("scale", "inception"):
            raise ValueError(f"crop must be 'scale' or 'inception', got {self.crop!r}")
        if self.resample not in jpeg.RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(jpeg.RESAMPLE)}, got {self.resample!r}")
        if not self.size <= self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range {self.scale_range} must start at or above size {self.size}")
        if self.eval_resize < self.size:
            raise ValueError(f"eval_resize {self.eval_resize} must be at least the crop size {self.size}")


@dataclasses.dataclass(frozen=True)
class TrainParams:
    """The random choices for one training example."""

    box: jpeg.Box  # source rectangle, in stored pixels, that becomes the size×size output
    scale: int | None  # the drawn shorter side S ("scale" crop only)
    flip: bool
    alpha: np.ndarray  # (3,) lighting coefficients, N(0, lighting_std)


DEFAULT = Preprocess()


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one training example's augmentation."""
    return np.random.default_rng([AUGMENT_TAG, seed, epoch, index])


def scale_crop_box(rng: np.random.Generator, width: int, height: int, scale_range: tuple[int, int],
                   size: int) -> tuple[jpeg.Box, int]:
    """The paper's crop: resize to shorter side S ~ U{scale_range}, take a uniform size×size window. Returns
    the window mapped back to stored pixels, and S."""
    s = int(rng.integers(scale_range[0], scale_range[1] + 1))
    rw, rh = jpeg.resized_size(width, height, s)
    top = int(rng.integers(0, rh - size + 1))
    left = int(rng.integers(0, rw - size + 1))
    # Integer products first: (rw * width) / rw is exactly width, so the box never pokes out of the image.
    return (left * width / rw, top * height / rh, (left + size) * width / rw, (top + size) * height / rh), s


def inception_crop_box(rng: np.random.Generator, width: int, height: int, area_range: tuple[float, float],
                       ratio_range: tuple[float, float], attempts: int = 10) -> jpeg.Box:
    """Random-resized crop (Szegedy et al. 2015, as torchvision): a window of random area fraction and
    log-uniform aspect; after ``attempts`` misses, the centre crop of the clamped aspect."""
    area = width * height
    log_ratio = (math.log(ratio_range[0]), math.log(ratio_range[1]))
    for _ in range(attempts):
        target = area * rng.uniform(*area_range)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return (left, top, left + w, top + h)
    if width / height < ratio_range[0]:
        w, h = width, round(width / ratio_range[0])
    elif width / height > ratio_range[1]:
        w, h = round(height * ratio_range[1]), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return (left, top, left + w, top + h)


def center_offset(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of the centre size×size window of a height×width image, as torchvision's ``CenterCrop``
    rounds them: ``int(round((h - size) / 2.0))``."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def _window(image: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    return np.ascontiguousarray(image[top:top + size, left:left + size])


def train_params(rng: np.random.Generator, width: int, height: int, cfg: Preprocess) -> TrainParams:
    scale = None
    if cfg.crop == "scale":
        box, scale = scale_crop_box(rng, width, height, cfg.scale_range, cfg.size)
    else:
        box = inception_crop_box(rng, width, height, cfg.area_range, cfg.ratio_range)
    flip = bool(rng.random() < 0.5)
    alpha = rng.normal(0.0, 1.0, 3) * cfg.lighting_std  # drawn even when std is 0: later draws stay put
    return TrainParams(box=box, scale=scale, flip=flip and cfg.flip, alpha=alpha)


def lighting_offset(alpha: np.ndarray) -> np.ndarray:
    """AlexNet PCA lighting: the RGB offset ``EIGVEC @ (alpha * EIGVAL)`` in [0, 1] units, one per image."""
    return (EIGVEC @ (np.asarray(alpha) * EIGVAL)).astype(np.float32)


def _rows(v: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(out, v) as arrays whose in-place arithmetic is fast: an RGB vector becomes one tiled image row, so
    numpy's inner loop runs over W*3 values instead of 3 (about 10x faster)."""
    if np.ndim(v) == 1:
        h, w, c = out.shape
        return out.reshape(h, w * c), np.tile(np.asarray(v, np.float32), w)
    return out, v


def finish(crop_u8: np.ndarray, mean: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """uint8 HWC crop -> float32 ``crop / 255 - mean (+ offset)``. ``mean`` is (H, W, 3) or (3,), in output
    coordinates (a mirrored crop is not matched by a mirrored mean); ``offset`` is (3,)."""
    out = crop_u8.astype(np.float32)
    out *= np.float32(1 / 255)
    view, m = _rows(mean, out)
    view -= m
    if offset is not None:
        view, o = _rows(offset, out)
        view += o
    return out


def finish_batch(images_u8, mean, offsets=None, xp=np):
    """uint8 NHWC batch -> float32 ``images / 255 - mean (+ offsets per image)`` with array module ``xp``
    (``jax.numpy`` inside a jitted step, where it fuses into one pass; or numpy). ``offsets``: (N, 3)."""
    x = xp.asarray(images_u8).astype(xp.float32) * (1 / 255) - xp.asarray(mean, xp.float32)
    if offsets is not None:
        x = x + xp.asarray(offsets, xp.float32)[:, None, None, :]
    return x


def train_crop(data: bytes, seed: int, epoch: int, index: int, cfg: Preprocess = DEFAULT
               ) -> tuple[np.ndarray, np.ndarray]:
    """The host part of one training example: the uint8 (size, size, 3) crop, mirrored if drawn so, and its
    lighting offset, float32 (3,) in [0, 1] units (zeros with lighting off)."""
    p = train_params(example_rng(seed, epoch, index), *jpeg.image_size(data), cfg)
    crop = jpeg.decode_box(data, p.box, (cfg.size, cfg.size), mirror=p.flip, draft=cfg.draft,
                           resample=cfg.resample)
    return crop, lighting_offset(p.alpha) if cfg.lighting_std else np.zeros(3, np.float32)


def train_example(data: bytes, mean: np.ndarray, seed: int, epoch: int, index: int,
                  cfg: Preprocess = DEFAULT) -> np.ndarray:
    """One augmented training image, finished on the host: float32 (size, size, 3)."""
    crop, offset = train_crop(data, seed, epoch, index, cfg)
    return finish(crop, mean, offset)


def eval_crop(data: bytes, cfg: Preprocess = DEFAULT) -> np.ndarray:
    """The uint8 centre crop the eval protocol and the mean start from: torchvision's ``Resize(eval_resize)``
    then ``CenterCrop(size)``, pixel for pixel (the whole image decoded and resized, then cropped)."""
    resized = jpeg.decode_resized(data, cfg.eval_resize, resample=cfg.resample)
    return _window(resized, *center_offset(*resized.shape[:2], cfg.size), cfg.size)


def eval_example(data: bytes, mean: np.ndarray, cfg: Preprocess = DEFAULT) -> np.ndarray:
    """One eval image: shorter side ``eval_resize``, centre crop, mean subtracted (float32)."""
    return finish(eval_crop(data, cfg), mean)


# ---- class names ----------------------------------------------------------------------------------------

CLASS_NAMES_FILE = "imagenet_classes.txt"  # beside this module, shipped with the package (setup.cfg)


def class_names() -> list[str]:
    """ImageNet-1k's 1000 English class names in label order (the sorted WordNet ids of ``imagenet2012``, as
    TFDS and torchvision number them), from the file ``tests/test_class_names.py`` writes from torchvision's
    weights' metadata (its header names the source)."""
    text = resources.files(__package__).joinpath(CLASS_NAMES_FILE).read_text(encoding="utf-8")
    names = [line for line in text.splitlines() if line and not line.startswith("#")]
    if len(names) != NUM_CLASSES:
        raise DataError(f"{CLASS_NAMES_FILE} in the resflax package holds {len(names)} names, not {NUM_CLASSES}: "
                        "reinstall resflax")
    return names


# ---- the mean -------------------------------------------------------------------------------------------


def channel_mean() -> np.ndarray:
    """The per-channel fallback mean, shape (3,), broadcasting over HWC."""
    return np.array(CHANNEL_MEAN, np.float32)


def compute_mean(images: Iterable[bytes], cfg: Preprocess = DEFAULT) -> np.ndarray:
    """Per-pixel mean (size, size, 3) float32 in [0, 1] units of the eval crops of ``images``."""
    total, n = np.zeros((cfg.size, cfg.size, 3), np.float64), 0
    for data in images:
        total += eval_crop(data, cfg)
        n += 1
    if n == 0:
        raise DataError("compute_mean got no images")
    return (total / (255.0 * n)).astype(np.float32)


def sample_images(source: Sequence[dict], num_images: int) -> Iterator[bytes]:
    """The encoded images of ``num_images`` examples spread evenly over ``source`` (indices by ``linspace``,
    so the sample covers the whole split whatever order its files are in)."""
    n = min(num_images, len(source))
    for i in np.linspace(0, len(source) - 1, n).round().astype(int):
        yield source[int(i)]["image"]


def mean_cache_path(cache_dir: str | os.PathLike, dataset: str, version: str, num_images: int,
                    cfg: Preprocess = DEFAULT) -> Path:
    """Where a per-pixel mean is cached: one file per dataset, version, sample size and crop settings."""
    # "-tv": of torchvision's exact eval crops (full decode, truncated size rule); means cached before lack it
    key = f"{dataset}-{version}-mean-n{num_images}-r{cfg.eval_resize}-c{cfg.size}-{cfg.resample}-tv"
    return Path(cache_dir) / f"{key}.npy"


def load_or_compute_mean(cache_path: str | os.PathLike, images: Callable[[], Iterable[bytes]],
                         cfg: Preprocess = DEFAULT) -> np.ndarray:
    """The cached per-pixel mean at ``cache_path``; if absent, ``compute_mean(images())`` written there
    atomically (a temporary file renamed into place, so a crash never leaves half a file)."""
    path = Path(cache_path)
    if path.exists():
        try:
            mean = np.load(path)
        except (OSError, ValueError) as e:
            raise DataError(f"cached mean {path} is unreadable ({e}); delete it to recompute") from e
        if mean.shape != (cfg.size, cfg.size, 3) or not np.isfinite(mean).all():
            raise DataError(f"cached mean {path} has shape {mean.shape} or non-finite values, expected "
                            f"({cfg.size}, {cfg.size}, 3); delete it to recompute")
        return mean.astype(np.float32)
    mean = compute_mean(images(), cfg)
    save_atomically(path, lambda f: np.save(f, mean))
    return mean


# ---- test protocols (the paper's Sec. 3.4) -------------------------------------------------------------

MULTISCALE = (224, 256, 384, 480, 640)


def five_crop_offsets(height: int, width: int, size: int) -> list[tuple[int, int]]:
    """(top, left) of the standard five windows of a height×width image: top-left, top-right, bottom-left,
    bottom-right, centre (torchvision's ``FiveCrop`` order and offsets)."""
    return [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size),
            center_offset(height, width, size)]


def ten_crops(data: bytes, cfg: Preprocess = DEFAULT) -> np.ndarray:
    """uint8 (10, size, size, 3): torchvision's ``TenCrop(size)`` of the image resized to shorter side
    ``eval_resize`` (as ``eval_crop``): the five windows, then the five windows of the mirrored image (its
    centre window is the mirror of the centre crop, shifted by a pixel when ``width - size`` is odd)."""
    resized = jpeg.decode_resized(data, cfg.eval_resize, resample=cfg.resample)
    return np.stack([_window(im, top, left, cfg.size) for im in (resized, resized[:, ::-1])
                     for top, left in five_crop_offsets(*im.shape[:2], cfg.size)])


def full_image(data: bytes, short_side: int, multiple: int = 32, cfg: Preprocess = DEFAULT) -> np.ndarray:
    """The whole image for fully-convolutional testing: shorter side ``short_side``, the longer side rounded
    to a multiple of ``multiple`` (an aspect change below 1/2 a multiple, i.e. at most 16 px of 640: it
    keeps the number of distinct shapes, and so of compilations, small). uint8 (H, W, 3)."""
    width, height = jpeg.image_size(data)
    rw, rh = jpeg.resized_size(width, height, short_side)
    rw, rh = (max(multiple, multiple * round(v / multiple)) if v != short_side else v for v in (rw, rh))
    return jpeg.decode_box(data, (0, 0, width, height), (rw, rh), resample=cfg.resample)
