"""The train state: a plain pytree (params, batch_stats, optimizer state, step, RNG, warm-up bookkeeping).

The data position is a function of ``step`` and the seed (epoch = step // steps_per_epoch, with a fresh
permutation per epoch), so restoring ``step`` and ``rng`` restores the input pipeline exactly.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from resflax.lazy import LazyModule
from resflax.models.resnet import pack_blocks

optax = LazyModule("optax")  # imported at first use: predict and export build no optimizer and no loss


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key: serialisable by Orbax as a plain array
    warmup_active: jax.Array  # bool: lr = warmup_lr while True
    train_error_ema: jax.Array  # float32: smoothed training error that ends the warm-up
    warmup_switch_step: jax.Array  # int32: step at which the warm-up ended, -1 if not (yet)


def weight_decay_mask(params: Any, on: str) -> Any:
    """Which leaves weight decay reaches: ``"all"`` (every parameter, as torch/Caffe reproductions do) or
    ``"kernels"`` (conv and fc kernels only; BN scale/bias and fc bias exempt)."""
    if on == "all":
        return jax.tree_util.tree_map(lambda _: True, params)
    if on == "kernels":
        return jax.tree_util.tree_map_with_path(lambda p, _: p[-1].key == "kernel", params)
    raise ValueError(f"weight_decay_on must be 'all' or 'kernels', got {on!r}")


def make_optimizer(params: Any, momentum: float, weight_decay: float, weight_decay_on: str):
    """SGD with momentum and L2 weight decay, PyTorch semantics: buf = m*buf + g + wd*w; w -= lr*buf.

    The learning rate is applied by the train step (it depends on the warm-up flag), not inside optax.
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask(params, weight_decay_on)),
        optax.trace(decay=momentum, nesterov=False),
    )


def optimizer(config) -> Any:
    """``params -> optax transformation``: the run's optimizer (``make_optimizer`` with the config's momentum
    and weight decay). The one place a run's optimizer is built from its config."""
    return functools.partial(make_optimizer, momentum=config.momentum, weight_decay=config.weight_decay,
                             weight_decay_on=config.weight_decay_on)


def abstract_state(model, tx_fn, seed: int, image_shape, warmup: bool, mesh) -> TrainState:
    """The train state's shapes and dtypes, replicated over ``mesh``: what a checkpoint is restored into.
    Nothing is computed or compiled (``jax.eval_shape`` of ``init_state``)."""
    shapes = jax.eval_shape(lambda: init_state(model, tx_fn, seed, image_shape, warmup))
    rep = NamedSharding(mesh, PartitionSpec())
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), shapes)


def init_state(model, tx_fn, seed: int, image_shape, warmup: bool, variables: Any = None) -> TrainState:
    """Initialises the model with He init from ``seed`` and builds the optimizer state; with ``variables``
    (``{"params", "batch_stats"}``, e.g. imported weights) the state holds those and nothing is initialised.
    Called eagerly only to start a new run: every other path (restoring, importing) traces it, inside
    ``jax.eval_shape`` (``abstract_state``) or ``jax.jit`` (one program, kept in the compilation cache)."""
    rng = jax.random.PRNGKey(seed)
    if variables is None:
        init_key = jax.random.fold_in(rng, 2)
        variables = model.init(init_key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    # stages the model scans hold their repeated blocks stacked (a few leaves instead of thousands in the
    # step); a no-op for every model that does not scan (all paper models but ResNet-1202)
    variables = pack_blocks(model, variables)
    params = variables["params"]
    tx = tx_fn(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=rng,
        warmup_active=jnp.asarray(warmup),
        train_error_ema=jnp.float32(0.9),
        warmup_switch_step=jnp.int32(-1),
    )


def tree_digest(host_tree: Any) -> str:
    """SHA-256 over every leaf (path, dtype, shape, bytes) of a host pytree: equal iff bit-identical."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(host_tree)[0]:
        arr = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{arr.dtype}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))  # the bytes, without copying them
    return h.hexdigest()


def state_digest(state: TrainState) -> str:
    """``tree_digest`` of params and batch_stats: the run's identity shown to users and in tests."""
    return tree_digest(jax.device_get({"params": state.params, "batch_stats": state.batch_stats}))
