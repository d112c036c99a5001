"""Helper for tests: a few train steps of a tiny model on synthetic data, losses printed as JSON.

Run as ``XLA_FLAGS=--xla_force_host_platform_device_count=N python tests/devices_run.py N SYNC [scan]``.
"""

import json
import sys

import jax
import numpy as np
from synthetic import tiny_step

from resflax.models import get_model
from resflax.train import state as state_lib
from resflax.train import step as step_lib


def main():
    ndev, sync = int(sys.argv[1]), sys.argv[2] == "sync"
    scan = len(sys.argv) > 3 and sys.argv[3] == "scan"  # a model whose stages run as a lax.scan
    assert jax.device_count() >= ndev, jax.devices()
    axis = step_lib.AXIS if sync else None
    if scan:
        model = get_model("resnet14", scan_min_blocks=2, bn_axis_name=axis)
    else:
        model = get_model("resnet8", bn_axis_name=axis)
    step, s, data = tiny_step(model, ndev)
    mesh = step_lib.make_mesh(ndev)
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
