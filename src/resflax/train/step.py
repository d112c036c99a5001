"""Data-parallel train steps: one jitted program over a 1-D ``('data',)`` mesh (the eval step, built the same
way, is ``train.evaluators``').

The steps run per device under ``jax.shard_map`` (the pmap semantics, without pmap): the state is
replicated, each device takes its slice of the global batch, gradients, metrics and BN running statistics
are averaged with ``lax.pmean``. The model's BatchNorm normalises groups of images (``bn_group_size``, see
``fastops.bn_groups``): each device's slice (the default, as the paper's two CIFAR GPUs did), groups of N
images whatever the device count (ImageNet: 32, the paper's 8 GPUs), or the global batch (``bn_sync``).

The CIFAR training set lives on the device (replicated); each step draws its batch from a per-epoch
permutation of the seed and augments it inside the step, so the hot loop has no host round-trip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resflax import xla as _xla
from resflax.data import augment
from resflax.lazy import LazyModule
from resflax.train import schedules
from resflax.train.state import TrainState

optax = LazyModule("optax")  # imported at first use: predict and export build no optimizer and no loss

_xla.configure()  # default XLA flags must be in place before the backend starts

AXIS = "data"


@dataclasses.dataclass(frozen=True)
class StepConfig:
    batch_size: int  # the global batch
    schedule: schedules.Schedule  # the lr (and the CIFAR warm-up rule), decided in train.schedules


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    devices = jax.devices()
    n = num_devices or len(devices)
    if n > len(devices):
        raise ValueError(f"asked for {n} devices but only {len(devices)} are available")
    return jax.make_mesh((n,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n])


def replicate(tree: Any, mesh) -> Any:
    """Places host arrays replicated on every device of ``mesh`` (works across processes too)."""
    sharding = NamedSharding(mesh, P())

    def put(x):
        x = jnp.asarray(x) if not hasattr(x, "shape") else x

        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree_util.tree_map(put, tree)


def _keys(state: TrainState):
    return jax.random.fold_in(state.rng, 0), jax.random.fold_in(state.rng, 1)


def batch_indices(rng_data: jax.Array, step: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
    """Global batch ``step``: a slice of the permutation of epoch ``step // steps_per_epoch``.

    Each epoch uses ``num_examples // batch_size`` full batches of a fresh permutation (the remainder of the
    permutation is dropped, so every batch has exactly ``batch_size`` distinct examples)."""
    steps_per_epoch = num_examples // batch_size
    epoch, pos = step // steps_per_epoch, step % steps_per_epoch
    perm = jax.random.permutation(jax.random.fold_in(rng_data, epoch), num_examples)
    return jax.lax.dynamic_slice(perm, (pos * batch_size,), (batch_size,))


def _sgd_update(model, tx, cfg: StepConfig, state: TrainState, x, y, lr_scale=None) -> tuple[TrainState, dict]:
    """One SGD step on this device's slice ``(x, y)``: gradients, loss, error and BN statistics averaged over
    the ``data`` axis; the lr is the schedule's (times ``lr_scale``, a factor decided on the host, when given);
    the warm-up flag's bookkeeping is updated."""

    rngs = {}
    if getattr(model, "dropout_rate", 0):  # VGG: a different dropout mask per step and per device
        key = jax.random.fold_in(jax.random.fold_in(state.rng, 3), state.step)
        rngs["dropout"] = jax.random.fold_in(key, jax.lax.axis_index(AXIS))

    def loss_fn(params):
        logits, new_vars = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"], rngs=rngs
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (logits, new_vars["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    error = jnp.mean(jnp.argmax(logits, -1) != y)
    grads, loss, error, batch_stats = jax.lax.pmean((grads, loss, error, batch_stats), AXIS)

    lr = cfg.schedule.lr(state.step, state.warmup_active)
    if lr_scale is not None:
        lr = lr * lr_scale
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree_util.tree_map(lambda p, u: p - (lr * u).astype(p.dtype), state.params, updates)

    ema, active, switch_step = cfg.schedule.warmup_update(state.step, state.warmup_active, state.train_error_ema,
                                                          state.warmup_switch_step, error)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        train_error_ema=ema,
        warmup_active=active,
        warmup_switch_step=switch_step,
    )
    return new_state, {"loss": loss, "error": error, "lr": lr}


def _batch_statistics(model, state: TrainState, x) -> tuple[TrainState, dict]:
    """A forward pass in train mode and no update (``resflax bn-stats``): the state with its running statistics
    replaced by this batch's (each BN's mean over its groups, averaged over the devices: the step's running
    average with momentum 0) and its step advanced to the next batch; the parameters are unchanged."""
    _, new_vars = model.clone(bn_momentum=0.0).apply(
        {"params": state.params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"])
    return state.replace(step=state.step + 1, batch_stats=jax.lax.pmean(new_vars["batch_stats"], AXIS)), {}


def _cifar_per_device(model, tx, cfg: StepConfig, local: int, std, stats_only: bool = False) -> Callable:
    """One device's part of a CIFAR train step: draws its slice of the batch ``state.step`` from the seed's
    permutation, augments it and takes the SGD step (``stats_only``: ``_batch_statistics`` instead)."""

    def per_device(state: TrainState, images, labels, mean):
        rng_data, rng_aug = _keys(state)
        gidx = batch_indices(rng_data, state.step, labels.shape[0], cfg.batch_size)
        d = jax.lax.axis_index(AXIS)
        lidx = jax.lax.dynamic_slice(gidx, (d * local,), (local,))
        positions = state.step * cfg.batch_size + d * local + jnp.arange(local)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(rng_aug, positions)
        x = augment.train_augment(images[lidx], mean, keys)
        if std is not None:  # imported weights' normalisation; the padding stays 0 (the mean colour)
            x = x / std
        if stats_only:
            return _batch_statistics(model, state, x)
        return _sgd_update(model, tx, cfg, state, x, labels[lidx])

    return per_device


def _local_batch(cfg: StepConfig, mesh) -> int:
    ndev = mesh.shape[AXIS]
    if cfg.batch_size % ndev:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by the {ndev} devices")
    return cfg.batch_size // ndev


def make_train_step(model, tx: optax.GradientTransformation, cfg: StepConfig, mesh, std=None,
                    stats_only: bool = False) -> Callable:
    """Returns ``step(state, images_u8, labels, mean) -> (state, metrics)``, jitted over ``mesh``; with
    ``stats_only`` the state gets the batch's BN statistics instead of an SGD step (``_batch_statistics``).

    ``images_u8``/``labels`` are the whole (replicated) training split; ``std`` (per channel) divides the
    mean-subtracted input when given (imported weights' normalisation); ``metrics`` holds ``loss``,
    ``error`` (fraction of the batch misclassified) and ``lr`` as device scalars.
    """
    per_device = _cifar_per_device(model, tx, cfg, _local_batch(cfg, mesh), std, stats_only)
    sharded = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(), P(), P(), P()), out_specs=(P(), P()), check_vma=False
    )
    return jax.jit(sharded, donate_argnums=(0,))


VECTORIZE = ("vmap", "loop")


def make_population_train_step(model, tx: optax.GradientTransformation, cfg: StepConfig, mesh, num_members: int,
                               std=None, residual: Sequence[bool] | None = None, vectorize: str = "vmap") -> Callable:
    """K networks of one parameter shape in one program: ``step(states, alive, images_u8, labels, mean) ->
    (states, metrics)``.

    ``states`` is a ``TrainState`` whose every leaf has a leading member axis of size K = ``num_members``;
    each member runs the single run's step (``make_train_step``) on its own state, so its seed gives its own
    initialisation, data order and augmentation. ``residual`` (one flag per member, or None: all as ``model``)
    makes members plain or residual networks of the same depth (option A: the same parameters). ``alive``
    (bool[K]): a member that is not alive keeps its state unchanged (a diverged member stops only itself).
    ``metrics`` leaves have shape [K].

    ``vectorize="vmap"`` batches the members with ``jax.vmap``: K small convolutions become one grouped one,
    the fast way on an accelerator; plain and residual members share one network whose shortcuts are
    multiplied by a per-member gate of 0 or 1 (``ResNet.residual_gate``). ``"loop"`` runs the members one
    after the other in the same program, each as its own static network with exactly the single run's
    operations: on the CPU a member then equals its single run bit for bit. vmap's grouped convolutions (and
    the gate's different fusion) sum in another order: a member agrees with its single run to float rounding
    after one step, and the runs drift apart the way any two float32 trainings do.
    """
    if vectorize not in VECTORIZE:
        raise ValueError(f"vectorize must be one of {VECTORIZE}, got {vectorize!r}")
    if residual is not None and len(residual) != num_members:
        raise ValueError(f"{len(residual)} residual flags for {num_members} members")
    local = _local_batch(cfg, mesh)
    mixed = residual is not None and len(set(residual)) > 1
    if residual is None:
        models = [model] * num_members
    else:
        models = [model.clone(residual=bool(r)) for r in residual]

    def run(m, state, alive_k, images, labels, mean):
        new, metrics = _cifar_per_device(m, tx, cfg, local, std)(state, images, labels, mean)
        return jax.tree_util.tree_map(lambda a, b: jnp.where(alive_k, a, b), new, state), metrics

    def per_device(states, alive, images, labels, mean):
        if vectorize == "vmap":
            if mixed:
                gates = jnp.asarray([1.0 if r else 0.0 for r in residual], jnp.float32)

                def member(state, gate, alive_k):
                    return run(model.clone(residual=True, residual_gate=gate), state, alive_k, images, labels, mean)

                return jax.vmap(member)(states, gates, alive)
            return jax.vmap(lambda st, al: run(models[0], st, al, images, labels, mean))(states, alive)
        outs = [run(models[k], jax.tree_util.tree_map(lambda a, k=k: a[k], states), alive[k], images, labels, mean)
                for k in range(num_members)]
        return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)

    sharded = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(),) * 5, out_specs=(P(), P()), check_vma=False
    )
    return jax.jit(sharded, donate_argnums=(0,))


def make_batch_train_step(model, tx: optax.GradientTransformation, cfg: StepConfig, mesh, finish: Callable,
                          stats_only: bool = False) -> Callable:
    """A train step fed from the host (ImageNet): ``step(state, images_u8, extra, labels, mean, lr_scale) ->
    (state, metrics)``. ``images_u8`` (uint8 NHWC), ``extra`` (per-image values for ``finish``, e.g. the
    lighting offsets) and ``labels`` are the global batch sharded over ``data``; ``finish(images, mean,
    extra)`` makes the float input on the device; the lr is the schedule's times ``lr_scale`` (drops decided
    on the host by the plateau rule, ``schedules.Plateau``). ``stats_only``: as ``make_train_step``'s."""
    if cfg.batch_size % mesh.shape[AXIS]:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by the {mesh.shape[AXIS]} devices")

    def per_device(state: TrainState, images, extra, labels, mean, lr_scale):
        x = finish(images, mean, extra)
        if stats_only:
            return _batch_statistics(model, state, x)
        return _sgd_update(model, tx, cfg, state, x, labels, lr_scale)

    sharded = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS), P(AXIS), P(), P()), out_specs=(P(), P()),
        check_vma=False,
    )
    return jax.jit(sharded, donate_argnums=(0,))


def step_config(boundaries: Sequence[int], batch_size: int, **lr) -> StepConfig:
    """A ``StepConfig`` from the lr settings of ``schedules.Schedule`` (``base_lr``, ``factor``, ``warmup_lr``,
    ...): for benchmarks and tests that build a step without a config."""
    return StepConfig(batch_size, schedules.Schedule(boundaries=tuple(int(b) for b in boundaries), **lr))
