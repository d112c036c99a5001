"""bfloat16 compute keeps float32 parameters and BN statistics, and trains like float32 on a short run."""

import jax
import jax.numpy as jnp
import numpy as np
from synthetic import tiny_step

from resflax.models import get_model


def _losses(dtype, steps=25):
    model = get_model("resnet8", dtype=dtype)
    rs = np.random.RandomState(0)
    # A learnable task: the label says which band of rows is bright.
    labels = rs.randint(0, 10, 128).astype(np.int32)
    images = rs.randint(0, 64, (128, 32, 32, 3)).astype(np.uint8)
    for i, y in enumerate(labels):
        images[i, 3 * y : 3 * y + 3, :, :] = 255
    step, s, data = tiny_step(model, batch_size=32, images=images, labels=labels, mean=0.3)
    out = []
    for _ in range(steps):
        s, m = step(s, *data)
        out.append(float(m["loss"]))
    return np.array(out), s


def test_bf16_keeps_float32_state_and_matches_float32_losses():
    l32, s32 = _losses(jnp.float32)
    l16, s16 = _losses(jnp.bfloat16)
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves((s16.params, s16.batch_stats, s16.opt_state))}
    assert dtypes == {jnp.dtype(jnp.float32)}
    assert abs(l16[0] - l32[0]) < 0.05 * l32[0]  # same initial loss up to bf16 rounding
    assert l16[-5:].mean() < 0.8 * l16[0] and l32[-5:].mean() < 0.8 * l32[0]  # both learn
    assert np.max(np.abs(l16 - l32)) < 0.15  # the curves agree step by step within bf16 noise
