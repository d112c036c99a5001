"""CIFAR-10 preprocessing of the paper (Sec. 4.2) as pure, jittable functions on NHWC batches.

Order: scale to [0, 1], subtract the per-pixel training mean, pad 4 zero pixels on each side (zeros *after*
mean subtraction, i.e. the padding is the mean image's colour, as in fb.resnet.torch), random 32x32 crop,
random horizontal flip. Test images get only the mean subtraction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PAD = 4


def normalize(images_u8: jax.Array, mean: jax.Array) -> jax.Array:
    """uint8 NHWC -> float32 with the per-pixel mean (HWC, in [0, 1]) subtracted."""
    return images_u8.astype(jnp.float32) / 255.0 - mean


def pad(images: jax.Array, pad: int = PAD) -> jax.Array:
    return jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def crop(padded: jax.Array, offsets: jax.Array, size: int) -> jax.Array:
    """Crops ``size x size`` windows at per-image ``offsets`` (N, 2) = (row, col) from padded images."""

    def one(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (size, size, img.shape[-1]))

    return jax.vmap(one)(padded, offsets)


def flip(images: jax.Array, do_flip: jax.Array) -> jax.Array:
    """Mirrors left-right the images where ``do_flip`` (N,) is True."""
    return jnp.where(do_flip[:, None, None, None], images[:, :, ::-1, :], images)


def random_params(keys: jax.Array, pad: int = PAD) -> tuple[jax.Array, jax.Array]:
    """Per-image crop offsets in [0, 2*pad] and flip bits, one PRNG key per image (so the draw of an image
    does not depend on how the batch is split across devices)."""

    def one(k):
        k1, k2 = jax.random.split(k)
        return jax.random.randint(k1, (2,), 0, 2 * pad + 1), jax.random.bernoulli(k2)

    return jax.vmap(one)(keys)


def train_augment(images_u8: jax.Array, mean: jax.Array, keys: jax.Array) -> jax.Array:
    size = images_u8.shape[1]
    offsets, flips = random_params(keys)
    x = pad(normalize(images_u8, mean))
    return flip(crop(x, offsets, size), flips)
