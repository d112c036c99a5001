"""Augmentation ops of the paper's CIFAR-10 recipe, each on its own."""

import jax
import jax.numpy as jnp
import numpy as np

from resflax.data import augment


def _images(n=4, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, 256, (n, 32, 32, 3)).astype(np.uint8))


def test_normalize_subtracts_per_pixel_mean():
    x = _images()
    mean = jnp.asarray(np.random.RandomState(1).rand(32, 32, 3).astype(np.float32))
    y = augment.normalize(x, mean)
    np.testing.assert_allclose(y, np.asarray(x, np.float32) / 255.0 - np.asarray(mean), atol=1e-6)


def test_pad_adds_four_zero_pixels_each_side():
    x = jnp.ones((2, 32, 32, 3))
    p = augment.pad(x)
    assert p.shape == (2, 40, 40, 3)
    assert float(jnp.abs(p[:, :4]).sum() + jnp.abs(p[:, -4:]).sum() + jnp.abs(p[:, :, :4]).sum()
                 + jnp.abs(p[:, :, -4:]).sum()) == 0.0
    assert bool(jnp.all(p[:, 4:36, 4:36] == 1))


def test_crop_at_centre_is_identity_and_corner_contains_padding():
    x = augment.normalize(_images(), jnp.zeros((32, 32, 3))) + 1.0  # strictly positive
    p = augment.pad(x)
    centre = augment.crop(p, jnp.full((4, 2), 4), 32)
    np.testing.assert_array_equal(centre, x)
    corner = augment.crop(p, jnp.zeros((4, 2), jnp.int32), 32)
    assert float(jnp.abs(corner[:, :4]).max()) == 0.0 and float(jnp.abs(corner[:, :, :4]).max()) == 0.0
    np.testing.assert_array_equal(corner[:, 4:, 4:], x[:, :28, :28])


def test_random_offsets_stay_within_padding_and_cover_it():
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    offsets, flips = augment.random_params(keys)
    offsets = np.asarray(offsets)
    assert offsets.min() == 0 and offsets.max() == 8  # every offset in [0, 2*pad], both ends reached
    assert set(np.unique(offsets)) == set(range(9))
    assert 0.45 < float(np.mean(flips)) < 0.55


def test_flip_mirrors_only_selected_images():
    x = _images().astype(jnp.float32)
    y = augment.flip(x, jnp.array([True, False, True, False]))
    np.testing.assert_array_equal(y[0], x[0, :, ::-1])
    np.testing.assert_array_equal(y[1], x[1])
    np.testing.assert_array_equal(augment.flip(y, jnp.array([True, False, True, False])), x)


def test_train_augment_is_a_crop_of_the_padded_normalised_image():
    x = _images(8)
    mean = jnp.full((32, 32, 3), 0.5)
    keys = jax.random.split(jax.random.PRNGKey(3), 8)
    out = augment.train_augment(x, mean, keys)
    offsets, flips = augment.random_params(keys)
    p = augment.pad(augment.normalize(x, mean))
    for i in range(8):
        r, c = map(int, offsets[i])
        want = p[i, r : r + 32, c : c + 32]
        if flips[i]:
            want = want[:, ::-1]
        np.testing.assert_array_equal(out[i], want)
