"""Shared test helper: the real train step of a small model on synthetic data, ready to call."""

import functools

import numpy as np

from resflax.train import state as state_lib
from resflax.train import step as step_lib


def tiny_step(model, ndev=1, batch_size=16, images=None, labels=None, mean=0.5, warmup=False,
              warmup_until_error=0.8):
    """``(step, state, data)``: ``step(state, *data) -> (state, metrics)`` over ``ndev`` devices.

    Without ``images``/``labels``, 64 random uint8 images and labels (seed 0) are used."""
    tx_fn = functools.partial(state_lib.make_optimizer, momentum=0.9, weight_decay=1e-4, weight_decay_on="all")
    mesh = step_lib.make_mesh(ndev)
    s = step_lib.replicate(state_lib.init_state(model, tx_fn, 0, (32, 32, 3), warmup=warmup), mesh)
    cfg = step_lib.step_config((1000,), batch_size=batch_size, base_lr=0.1, factor=0.1, warmup_lr=0.01,
                               warmup_until_error=warmup_until_error)
    if images is None:
        rs = np.random.RandomState(0)
        images = rs.randint(0, 256, (64, 32, 32, 3)).astype(np.uint8)
        labels = rs.randint(0, 10, 64).astype(np.int32)
    data = step_lib.replicate((images, labels, np.full((32, 32, 3), mean, np.float32)), mesh)
    return step_lib.make_train_step(model, tx_fn(s.params), cfg, mesh), s, data
