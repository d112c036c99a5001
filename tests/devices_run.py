"""Helper for tests: a few train steps of a tiny model on synthetic data, losses printed as JSON.

Run as ``XLA_FLAGS=--xla_force_host_platform_device_count=N python tests/devices_run.py N SYNC``.
"""

import functools
import json
import sys

import jax
import numpy as np

from resflax.models import get_model
from resflax.train import state as state_lib
from resflax.train import step as step_lib


def main():
    ndev, sync = int(sys.argv[1]), sys.argv[2] == "sync"
    assert jax.device_count() >= ndev, jax.devices()
    model = get_model("resnet8", bn_axis_name=step_lib.AXIS if sync else None)
    tx_fn = functools.partial(state_lib.make_optimizer, momentum=0.9, weight_decay=1e-4, weight_decay_on="all")
    mesh = step_lib.make_mesh(ndev)
    s = step_lib.replicate(state_lib.init_state(model, tx_fn, 0, (32, 32, 3), warmup=False), mesh)
    cfg = step_lib.step_config((1000,), batch_size=16, base_lr=0.1, factor=0.1, warmup_lr=0.01,
                               warmup_until_error=0.8)
    rs = np.random.RandomState(0)
    data = step_lib.replicate((rs.randint(0, 256, (64, 32, 32, 3)).astype(np.uint8),
                               rs.randint(0, 10, 64).astype(np.int32), np.full((32, 32, 3), 0.5, np.float32)), mesh)
    step = step_lib.make_train_step(model, tx_fn(s.params), cfg, mesh)
    losses = []
    for _ in range(4):
        s, m = step(s, *data)
        losses.append(float(m["loss"]))
    ev = step_lib.evaluate(step_lib.make_eval_step(model, mesh), s, np.asarray(data[0][:40]),
                           np.asarray(data[1][:40]), data[2], 16, mesh)
    print(json.dumps({"losses": losses, "eval_error": ev["error"], "count": ev["count"],
                      "digest": state_lib.state_digest(s)}))


if __name__ == "__main__":
    main()
