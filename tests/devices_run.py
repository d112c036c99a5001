"""Helper for tests: a few train steps of a tiny model on synthetic data, losses printed as JSON.

Run as ``XLA_FLAGS=--xla_force_host_platform_device_count=N python tests/devices_run.py N SYNC [scan]``, or
``... devices_run.py N bncheck OUT.npz`` for the per-device BatchNorm check (see ``bn_check``), ``... devices_run.py N
ghost OUT.npz`` for the BatchNorm-groups check (see ``ghost_check``).
"""

import functools
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from synthetic import tiny_step

from resflax.data import augment
from resflax.models import fastops, get_model
from resflax.train import evaluators
from resflax.train import state as state_lib
from resflax.train import step as step_lib

BN_LOCAL, BN_SHAPE = 3, (4, 4, 5)  # images per device and image shape of the single-layer BatchNorm check


def _put(arrays, name, tree):
    """Saves the leaves of ``tree`` as ``name/<keystr path>`` (``name`` alone for an array)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
        arrays[name + ("/" + jax.tree_util.keystr(path) if path else "")] = np.asarray(leaf)


def _bn_on_devices(bn, params, stats, x, mesh):
    """One train-mode application of the BatchNorm layer ``bn`` to ``x`` split over the mesh's devices: (its
    output, the running statistics averaged over the devices)."""

    def per_device(xs):
        y, upd = bn.apply({"params": params, "batch_stats": stats}, xs, use_running_average=False,
                          mutable=["batch_stats"])
        return y, jax.lax.pmean(upd["batch_stats"], step_lib.AXIS)

    f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P(step_lib.AXIS),
                              out_specs=(P(step_lib.AXIS), P()), check_vma=False))
    return f(x)


def bn_check(ndev, out):
    """Saves (npz) what the per-device BatchNorm check of test_parallel compares with numpy:

    * ``layer/...``: one BatchNorm layer (``fast`` and ``flax``, per device ``local`` or synchronised ``sync``)
      run in train mode under ``shard_map`` over ``ndev`` devices, each device holding ``BN_LOCAL`` images of
      a batch whose slices have very different statistics; the updated running statistics are pmean'd over
      the devices, as the train step does. Inputs, parameters, outputs, statistics.
    * ``step/...``: one real train step (``make_train_step``) of ResNet-8 with per-device BN on 16 images:
      the initial params/batch_stats, the global batch the step draws and augments (rebuilt here with the
      step's own functions), the loss and learning rate, and the params/batch_stats after the step.
    """
    arrays = {}
    mesh = step_lib.make_mesh(ndev)
    rs = np.random.RandomState(0)
    c = BN_SHAPE[-1]
    x = np.concatenate([rs.randn(BN_LOCAL, *BN_SHAPE) * (1 + d) + 2 * d - 1 for d in range(ndev)]).astype(np.float32)
    params = {"scale": (rs.rand(c) + 0.5).astype(np.float32), "bias": rs.randn(c).astype(np.float32)}
    stats = {"mean": rs.randn(c).astype(np.float32), "var": (rs.rand(c) + 0.5).astype(np.float32)}
    _put(arrays, "layer/x", x)
    _put(arrays, "layer/params", params)
    _put(arrays, "layer/stats", stats)
    for impl, cls in (("fast", fastops.BatchNorm), ("flax", nn.BatchNorm)):
        for mode, axis in (("local", None), ("sync", step_lib.AXIS)):
            y, new_stats = _bn_on_devices(cls(momentum=0.9, epsilon=1e-5, axis_name=axis), params, stats, x, mesh)
            _put(arrays, f"layer/{impl}/{mode}/y", y)
            _put(arrays, f"layer/{impl}/{mode}/stats", new_stats)

    model = get_model("resnet8")  # bn_axis_name=None: statistics per device
    step, s, data = tiny_step(model, ndev)
    host = jax.device_get(s)
    _put(arrays, "step/params0", host.params)
    _put(arrays, "step/batch_stats0", host.batch_stats)
    # the global batch of step 0, as make_train_step draws it (device d takes rows d*local:(d+1)*local)
    images, labels, mean = (np.asarray(a) for a in data)
    rng_data, rng_aug = step_lib._keys(host)
    gidx = np.asarray(step_lib.batch_indices(rng_data, jnp.asarray(host.step), len(labels), 16))
    keys = jax.vmap(jax.random.fold_in, (None, 0))(rng_aug, jnp.arange(16))
    _put(arrays, "step/x", augment.train_augment(jnp.asarray(images[gidx]), jnp.asarray(mean), keys))
    _put(arrays, "step/y", labels[gidx])
    s, m = step(s, *data)
    _put(arrays, "step/metrics", m)
    _put(arrays, "step/params1", s.params)
    _put(arrays, "step/batch_stats1", s.batch_stats)
    np.savez(out, **arrays)
    print(json.dumps({"devices": jax.device_count(), "saved": len(arrays)}))


GHOST = 32  # BN group size of the ghost-batch check; its global batch is GHOST_BATCH
GHOST_BATCH = 64


def ghost_images():
    """``GHOST_BATCH`` uint8 images and labels whose brightness and contrast differ from image to image, so that
    groups of different images have clearly different statistics."""
    rs = np.random.RandomState(1)
    scale = rs.uniform(0.2, 1.0, (GHOST_BATCH, 1, 1, 1))
    offset = rs.uniform(0, 100, (GHOST_BATCH, 1, 1, 1))
    images = np.clip(rs.rand(GHOST_BATCH, 32, 32, 3) * 155 * scale + offset, 0, 255).astype(np.uint8)
    return images, rs.randint(0, 10, GHOST_BATCH).astype(np.int32)


def ghost_check(ndev, out):
    """Saves (npz) what test_parallel's BatchNorm-groups check compares across device counts and with a direct
    computation, all at group size ``GHOST``:

    * ``layer/...``: one BatchNorm layer (``fast``, ``fast`` with the unbiased running variance, ``flax``) in
      train mode under ``shard_map`` on a batch of ``GHOST_BATCH`` images whose groups have very different
      statistics, updated running statistics pmean'd over the devices as the train step does.
    * ``step/<impl>/...``: one real train step (``make_train_step``) of ResNet-8 on ``GHOST_BATCH`` images: the
      global batch it draws (rebuilt with the step's own functions), the params/batch_stats before and after,
      the loss and the learning rate.
    """
    arrays = {}
    mesh = step_lib.make_mesh(ndev)
    rs = np.random.RandomState(0)
    shape = (2, 2, 3)
    groups = GHOST_BATCH // GHOST
    x = np.concatenate([rs.randn(GHOST, *shape) * (1 + g) + 3 * g - 1 for g in range(groups)]).astype(np.float32)
    c = shape[-1]
    params = {"scale": (rs.rand(c) + 0.5).astype(np.float32), "bias": rs.randn(c).astype(np.float32)}
    stats = {"mean": rs.randn(c).astype(np.float32), "var": (rs.rand(c) + 0.5).astype(np.float32)}
    _put(arrays, "layer/x", x)
    _put(arrays, "layer/params", params)
    _put(arrays, "layer/stats", stats)
    layers = {"fast": fastops.BatchNorm, "flax": fastops.FlaxBatchNorm,
              "fast_unbiased": functools.partial(fastops.BatchNorm, unbiased_running_var=True)}
    for name, cls in layers.items():
        bn = cls(momentum=0.9, epsilon=1e-5, axis_name=step_lib.AXIS, group_size=GHOST)
        y, new_stats = _bn_on_devices(bn, params, stats, x, mesh)
        _put(arrays, f"layer/{name}/y", y)
        _put(arrays, f"layer/{name}/stats", new_stats)

    images, labels = ghost_images()
    for impl in ("fast", "flax"):
        model = get_model("resnet8", impl=impl, bn_axis_name=step_lib.AXIS, bn_group_size=GHOST)
        step, s, data = tiny_step(model, ndev, batch_size=GHOST_BATCH, images=images, labels=labels)
        host = jax.device_get(s)
        _put(arrays, f"step/{impl}/params0", host.params)
        _put(arrays, f"step/{impl}/batch_stats0", host.batch_stats)
        if impl == "fast":  # the global batch of step 0 (the same for both)
            mean = np.asarray(data[2])
            rng_data, rng_aug = step_lib._keys(host)
            gidx = np.asarray(step_lib.batch_indices(rng_data, jnp.asarray(host.step), len(labels), GHOST_BATCH))
            keys = jax.vmap(jax.random.fold_in, (None, 0))(rng_aug, jnp.arange(GHOST_BATCH))
            _put(arrays, "step/x", augment.train_augment(jnp.asarray(images[gidx]), jnp.asarray(mean), keys))
            _put(arrays, "step/y", labels[gidx])
        s, m = step(s, *data)
        _put(arrays, f"step/{impl}/metrics", m)
        _put(arrays, f"step/{impl}/params1", s.params)
        _put(arrays, f"step/{impl}/batch_stats1", s.batch_stats)
    np.savez(out, **arrays)
    print(json.dumps({"devices": jax.device_count(), "saved": len(arrays)}))


def main():
    ndev = int(sys.argv[1])
    assert jax.device_count() >= ndev, jax.devices()
    if sys.argv[2] == "bncheck":
        return bn_check(ndev, sys.argv[3])
    if sys.argv[2] == "ghost":
        return ghost_check(ndev, sys.argv[3])
    sync = sys.argv[2] == "sync"
    scan = len(sys.argv) > 3 and sys.argv[3] == "scan"  # a model whose stages run as a lax.scan
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
    ev = evaluators.on_arrays(evaluators.make_eval_step(model, mesh), np.asarray(data[0][:40]),
                              np.asarray(data[1][:40]), data[2], 16, mesh).run(s)
    print(json.dumps({"losses": losses, "eval_error": ev["error"], "count": ev["count"],
                      "digest": state_lib.state_digest(s)}))


if __name__ == "__main__":
    main()
