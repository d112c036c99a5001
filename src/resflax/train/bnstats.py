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
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from resflax.errors import BadInput
from resflax.train import evaluate, loop, tasks, transfer
from resflax.train import state as state_lib
from resflax.train import step as step_lib
from resflax.train import workdir as wd
from resflax.train.checkpoint import Checkpointer
from resflax.train.distributed import to_host


def recompute(workdir: str | Path, out: str | Path, batches: int, data_dir: str | None = None,
              say=print) -> dict[str, Any]:
    """Writes ``workdir``'s latest checkpoint with BN statistics averaged over ``batches`` training batches as
    a new run in ``out`` (refused unless absent or an empty folder); returns what was done."""
    if batches < 1:
        raise BadInput(f"--batches must be positive, got {batches}")
    if wd.population_members(workdir) is not None:
        raise BadInput(f"{workdir} is a population: give one member's directory ({workdir}/members/NAME)")
    path = Path(out).expanduser().absolute()
    transfer._refuse_existing(path)  # before anything is read, locked or written
    config = evaluate.load_config(workdir)
    if data_dir:
        config.data_dir = data_dir
    config, _, state = evaluate.restore(workdir, config, purpose="recompute BatchNorm statistics for")
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
    new = host0.replace(batch_stats=mean)
    record = {"from": str(Path(workdir).absolute()), "step": step, "batches": batches,
              "images": batches * config.batch_size, "augmentation": "training",
              "bn_group_size": config.get("bn_group_size") or 0}
    wd.prepare(path.parent)
    build, lock = transfer._start_build(path)
    try:
        cfg = json.loads(config.to_json())
        wd.write_json_atomic(build / "config.json", cfg)
        digest = state_lib.state_digest(new)
        meta = {k: v for k, v in meta.items() if k != "tree_digest"}
        meta.update(config=cfg, state_digest=digest, bn_stats=record)
        ckpt = Checkpointer(build, keep=config.keep_checkpoints)
        ckpt.save(step, step_lib.replicate(new, p.mesh), meta, host_state=new)
        ckpt.close()  # waits until the asynchronous save is complete (or raises CheckpointError)
        transfer._publish(build, path)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    finally:
        lock.release()
    return {"workdir": str(path), "model": config.model, "state_digest": digest, **record}
