"""VGG-16 and VGG-19 (Simonyan & Zisserman 2015, configurations D and E): the paper's Fig. 3 and Table 3
baselines. Five stages of 3x3 convolutions (padding 1, ReLU), each followed by a 2x2/2 max-pool, then three
fully-connected layers (4096, 4096, classes) with dropout 0.5 before the second and third, as torchvision's
``vgg16``/``vgg19`` (no BatchNorm; the same parameter count: 138,357,544 / 143,667,240 with 1000 classes).

Layer names: ``conv{i}`` in order (i = 0..12 or 0..15), ``fc{j}`` (j = 0..2). The features are flattened
in NHWC order (7x7x512 at 224 px; an adaptive average pool to 7x7 first, as torchvision, so other sizes
work, though not as VGG's fully-convolutional dense evaluation would: see ``train.protocols``): importing
torchvision's ``classifier.0`` weight needs its input axis permuted from CHW to HWC.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resflax.models import initializers

CONFIGS = {
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
WIDTHS = (64, 128, 256, 512, 512)


def _adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    """torchvision's ``AdaptiveAvgPool2d(size)`` on NHWC: bin i covers [floor(i*H/s), ceil((i+1)*H/s))."""
    h, w = x.shape[1:3]
    if (h, w) == (size, size):
        return x
    rows = []
    for i in range(size):
        r0, r1 = (i * h) // size, -(-((i + 1) * h) // size)
        cols = [jnp.mean(x[:, r0:r1, (j * w) // size: -(-((j + 1) * w) // size)], axis=(1, 2))
                for j in range(size)]
        rows.append(jnp.stack(cols, axis=1))
    return jnp.stack(rows, axis=1)


class VGG(nn.Module):
    """VGG of ``depth`` 16 or 19; ``train=True`` turns dropout on (needs a ``"dropout"`` rng)."""

    depth: int = 16
    num_classes: int = 1000
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    stem: str = "imagenet"  # the input family (224 px ImageNet images), as ResNet's field

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.depth not in CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(CONFIGS)}, got {self.depth}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # torchvision's init: He (fan_out) for convs with zero bias; N(0, 0.01) for the FC layers
        conv_init = initializers.variance_scaling(2.0, "fan_out", "normal")  # JAX's, see initializers.py
        x = jnp.asarray(x, self.dtype)
        k = 0
        for n, width in zip(CONFIGS[self.depth], WIDTHS):
            for _ in range(n):
                x = nn.relu(nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), kernel_init=conv_init,
                                    name=f"conv{k}", **kw)(x))
                k += 1
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = _adaptive_avg_pool(x, 7).reshape((x.shape[0], -1))
        dense = dict(kernel_init=initializers.normal(0.01), **kw)
        x = nn.relu(nn.Dense(4096, name="fc0", **dense)(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.relu(nn.Dense(4096, name="fc1", **dense)(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, name="fc2", **dense)(x)
        return jnp.asarray(x, jnp.float32)
