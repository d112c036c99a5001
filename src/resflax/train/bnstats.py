"""``resflax bn-stats``: a run's BatchNorm statistics recomputed after training, the released models' way.

The Caffe models the paper's authors released do not use the moving averages of training: "the BN layers'
mean and variance are computed using average (not moving average) on a sufficiently large training batch
after the training procedure" (KaimingHe/deep-residual-networks, README). ``recompute`` does that for a run:
it runs ``batches`` training batches through the network in train mode, without any update, and replaces
each BN layer's running mean and variance by the plain average over those batches of the batch statistics
the layer normalised with (per batch: the mean over its BN groups, ``bn_group_size``, of each group's mean
and variance, biased unless ``bn_unbiased_var``: exactly what the train step's running average moves
towards).

The batches are the training input itself, with the training augmentation (CIFAR-10: the padded random
crops and flips; ImageNet: scale augmentation, random crops, flips, lighting), the ones training would have
drawn next after the checkpoint's step: BN's parameters were learnt against the statistics of augmented
training batches, so that is the distribution the running statistics should describe (centre crops of
training images are a narrower one).

The result is a new run (``OUT``: ``config.json`` and one checkpoint at the source's step, whose metadata
records ``bn_stats``), written like an import: atomically, beside the untouched source run. ``resflax eval``,
``predict``, ``export`` and ``train`` use it like any run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from resflax.errors import BadInput
from resflax.interrupts import Interrupts
from resflax.train import evaluate, loop, tasks, transfer
from resflax.train import state as state_lib
from resflax.train import workdir as wd
from resflax.train.distributed import to_host


def recompute(workdir: str | Path, out: str | Path, batches: int, data_dir: str | None = None,
              say=print) -> dict[str, Any]:
    """Writes ``workdir``'s latest checkpoint with BN statistics averaged over ``batches`` training batches as
    a new run in ``out`` (refused unless absent or an empty folder); returns what was done."""
    if batches < 1:
        raise BadInput(f"--batches must be positive, got {batches}")
    if wd.population_members(workdir) is not None:
        raise BadInput(f"{workdir} is a population: give one member's directory ({workdir}/members/NAME)")
    path = transfer.new_run_dir(out)  # refused before anything is read, locked or written
    with Interrupts(defer=False) as interrupts:  # nothing written until write_run: a signal stops it at once
        return _recompute(workdir, path, batches, data_dir, say, interrupts)


def _recompute(workdir, path: Path, batches: int, data_dir, say, interrupts: Interrupts) -> dict[str, Any]:
    config = evaluate.load_config(workdir)
    if data_dir:
        config.data_dir = data_dir
    config, _, state = evaluate.restore(workdir, config, purpose="recompute BatchNorm statistics for",
                                     whole=True)
    if not jax.tree_util.tree_leaves(state.batch_stats):
        raise BadInput(f"{config.model} has no BatchNorm statistics")
    step = int(to_host(state.step))
    p = loop.plan(config)
    p = dataclasses.replace(p, num_steps=step + batches)  # the loader's end: the batches used here
    host0 = to_host(state)
    meta = json.loads((Path(workdir) / "checkpoints" / str(step) / "meta" / "metadata").read_text())
    task = tasks.create(config, p, say)
    try:
        task.build(p.model, state_lib.optimizer(config)(state.params), p.step_cfg, stats_only=True)
        task.start(step, None)
        total = None
        for _ in range(batches):
            state, _ = task.train_step(state)
            stats = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), to_host(state.batch_stats))
            total = stats if total is None else jax.tree_util.tree_map(np.add, total, stats)
    finally:
        task.close()
    mean = jax.tree_util.tree_map(lambda a: (a / batches).astype(np.float32), total)
    record = {"from": str(Path(workdir).absolute()), "step": step, "batches": batches,
              "images": batches * config.batch_size, "augmentation": "training",
              "bn_group_size": config.get("bn_group_size") or 0}
    meta = {k: v for k, v in meta.items() if k not in ("tree_digest", "config", "state_digest")}
    digest = transfer.write_run(path, config, host0.replace(batch_stats=mean), {**meta, "bn_stats": record},
                                p.mesh, interrupts)
    return {"workdir": str(path), "model": config.model, "state_digest": digest, **record}
