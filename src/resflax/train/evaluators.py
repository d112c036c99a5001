"""Evaluation, decided once. An evaluator holds what one evaluation needs (a network's program and a split's
batches) and ``run(state_or_variables)`` returns the split's metrics ``{"error", ["top5_error"], ["loss"],
"count"}`` (errors in percent, the loss per example). Every evaluation sums per-example values over padded,
masked batches and ends in ``metrics``: the sums of errors (top-5 errors, loss) divided by the number of
examples, after the check that every example was counted exactly once.

- ``Evaluator``: the data-parallel eval step (``make_eval_step``, the same program for training and
  ``resflax eval``) over batches sharded on the ``data`` mesh: a split held in memory (CIFAR-10,
  ``on_arrays``) or read by grain (ImageNet-style, ``on_loader``). The tasks' ``evaluate`` (the loop's test
  and held-out evaluations) and ``resflax eval``'s ``center`` protocol are this code.
- ``protocols.ProtocolEvaluator``: ``resflax eval --protocol 10crop|multiscale`` (the softmax of several
  views averaged per image on the host), counted by ``metrics`` too.
- ``analysis.responses``: Fig. 7's statistics over ``padded`` batches, its count checked by ``check_count``.

Below the loop: imports neither ``loop``, ``tasks`` nor ``population``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resflax.data import augment, imagenet_input
from resflax.lazy import LazyModule
from resflax.train.distributed import to_host
from resflax.train.step import AXIS

optax = LazyModule("optax")  # imported at first use: predict and export build no optimizer and no loss


def make_eval_step(model, mesh, normalize: Callable = augment.normalize, top5: bool = False) -> Callable:
    """Returns ``eval(state_params, batch_stats, images_u8, labels, mask, mean) -> sums``: summed loss,
    errors (and with ``top5`` the top-5 errors) and count over the unmasked examples of a batch sharded over
    ``data``; ``normalize(images_u8, mean)`` makes the float input."""

    def per_device(params, batch_stats, images, labels, mask, mean):
        x = normalize(images, mean)
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        wrong = (jnp.argmax(logits, -1) != labels).astype(jnp.float32)
        m = mask.astype(jnp.float32)
        sums = {"loss": jnp.sum(loss * m), "errors": jnp.sum(wrong * m), "count": jnp.sum(m)}
        if top5:
            k = min(5, logits.shape[-1])
            in_top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)
            sums["errors5"] = jnp.sum((~in_top5).astype(jnp.float32) * m)
        return jax.lax.psum(sums, AXIS)

    sharded = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS), P()),
        out_specs=P(),
        check_vma=False,
    )
    return jax.jit(sharded)


# ---- the exact count ----------------------------------------------------------------------------------------

def check_count(count: float, expected: int, what: str = "evaluation") -> None:
    """Every example counted exactly once (the padding masked out), or ``RuntimeError``."""
    if int(count) != expected:
        raise RuntimeError(f"{what} counted {count} examples, expected {expected}")


def metrics(sums: Mapping[str, float], expected: int, what: str = "evaluation") -> dict[str, float]:
    """``{"error", ["top5_error"], ["loss"], "count"}`` from summed host values ``errors``, ``count`` and,
    when present, ``errors5`` and ``loss``, after ``check_count``: the one way resflax turns sums over a split
    into its metrics."""
    check_count(sums["count"], expected, what)
    out = {"error": 100.0 * sums["errors"] / expected}
    if "errors5" in sums:
        out["top5_error"] = 100.0 * sums["errors5"] / expected
    if "loss" in sums:
        out["loss"] = sums["loss"] / expected
    out["count"] = expected
    return out


def variables(state_or_variables) -> tuple[Any, Any]:
    """``(params, batch_stats)`` of a train state or of a ``{"params", "batch_stats"}`` dict."""
    if isinstance(state_or_variables, Mapping):
        return state_or_variables["params"], state_or_variables.get("batch_stats", {})
    return state_or_variables.params, state_or_variables.batch_stats


# ---- batches ------------------------------------------------------------------------------------------------

def padded(batch_size: int, *arrays: np.ndarray) -> Iterator[tuple[np.ndarray, ...]]:
    """``(*arrays' batch, mask)`` for consecutive batches of ``batch_size`` examples of the host arrays
    ``arrays``; the last one is padded with zeros, ``mask`` (bool) is True on the real examples."""
    n = len(arrays[0])
    for start in range(0, n, batch_size):
        parts = [a[start:start + batch_size] for a in arrays]
        k = len(parts[0])
        mask = np.zeros((batch_size,), bool)
        mask[:k] = True
        if k < batch_size:
            parts = [np.concatenate([a, np.zeros((batch_size - k, *a.shape[1:]), a.dtype)]) for a in parts]
        yield (*parts, mask)


_PLACED: dict = {}


def _placed_batches(images, labels, batch_size: int, mesh) -> list:
    """The split cut into padded, masked batches sharded over ``data``, placed on the devices once and
    reused by later evaluations of the same arrays (no host-to-device copies in the training loop)."""
    key = (id(images), id(labels), batch_size, id(mesh))
    hit = _PLACED.get(key)
    if hit is not None and hit[0]() is images and hit[1]() is labels:
        return hit[2]
    sharding = NamedSharding(mesh, P(AXIS))
    batches = [tuple(jax.make_array_from_callback(a.shape, sharding, lambda idx, a=a: a[idx]) for a in batch)
               for batch in padded(batch_size, images, labels)]
    if len(_PLACED) >= 4:
        _PLACED.clear()
    try:
        _PLACED[key] = (weakref.ref(images), weakref.ref(labels), batches)
    except TypeError:  # arrays that cannot be weakly referenced are simply not cached
        pass
    return batches


def array_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, mesh) -> Callable[[], list]:
    """A split held in host memory: batches of ``batch_size`` (rounded down to a multiple of the devices)
    placed on the devices at the first evaluation and kept for the next ones."""
    ndev = mesh.shape[AXIS]
    batch_size = max(ndev, batch_size - batch_size % ndev)
    return lambda: _placed_batches(images, labels, batch_size, mesh)


def loader_batches(source, cfg, batch_size: int, mesh, workers: int, read_threads: int) -> Callable[[], Iterator]:
    """A split of encoded images read through grain (``data.imagenet_input.eval_dataset``: the centre crop of
    ``cfg``): each process reads its share of every global batch of ``batch_size`` (rounded down to a
    multiple of the devices and processes), padded and masked, and the batch is sharded over ``data``."""
    pcount, pindex = jax.process_count(), jax.process_index()
    ndev = mesh.size
    unit = ndev * pcount // np.gcd(ndev, pcount)
    batch = max(unit, batch_size - batch_size % unit)
    sharding = NamedSharding(mesh, P(AXIS))

    def batches() -> Iterator:
        ds = imagenet_input.eval_dataset(source, batch, pindex, pcount, cfg)
        it = imagenet_input.loader(ds, workers=workers, read_threads=read_threads)
        try:
            for b in it:
                yield tuple(jax.make_array_from_process_local_data(sharding, np.ascontiguousarray(b[k]))
                            for k in ("image", "label", "mask"))
        finally:
            it.close()  # stops grain's worker processes

    return batches


# ---- the evaluator ------------------------------------------------------------------------------------------

class Evaluator:
    """Exact evaluation of one network on one split: ``run(state_or_variables) -> {"error", ["top5_error"],
    "loss", "count"}``. ``eval_step`` is ``make_eval_step``'s program, ``batches()`` gives the split's
    ``(images, labels, mask)`` batches sharded over ``data``, ``mean`` is the (replicated) input mean."""

    def __init__(self, eval_step: Callable, batches: Callable[[], Iterable], num_examples: int, mean):
        self.eval_step, self.batches, self.num_examples, self.mean = eval_step, batches, num_examples, mean

    def run(self, state_or_variables) -> dict[str, float]:
        params, batch_stats = variables(state_or_variables)
        sums = None
        batches = self.batches()
        try:
            for xb, yb, mask in batches:
                out = self.eval_step(params, batch_stats, xb, yb, mask, self.mean)
                sums = out if sums is None else jax.tree_util.tree_map(jnp.add, sums, out)
        finally:
            close = getattr(batches, "close", None)  # a reader stopped early stops its workers
            if close is not None:
                close()
        return metrics({k: float(v) for k, v in to_host(sums).items()}, self.num_examples)


def on_arrays(eval_step: Callable, images: np.ndarray, labels: np.ndarray, mean, batch_size: int,
              mesh) -> Evaluator:
    """The evaluator of a split held in host memory (``array_batches``)."""
    return Evaluator(eval_step, array_batches(images, labels, batch_size, mesh), len(labels), mean)


def on_loader(eval_step: Callable, source, cfg, mean, batch_size: int, mesh, workers: int = 0,
              read_threads: int = 0) -> Evaluator:
    """The evaluator of a split of encoded images read by grain (``loader_batches``)."""
    return Evaluator(eval_step, loader_batches(source, cfg, batch_size, mesh, workers, read_threads), len(source),
                     mean)
