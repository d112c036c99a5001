"""Evaluate the latest checkpoint of a workdir on the full test split (every image exactly once): CIFAR-10's
test split, or an ImageNet-style dataset's validation split (the centre crop; top-1 and top-5).

Read-only: nothing in the workdir is created, moved or deleted (a damaged checkpoint is skipped with a
warning and left for the next ``resflax train`` to set aside), so it is safe while a training run holds the
workdir.

``restore`` is every read path's way into a run (eval, predict, export, responses): config -> model
(``build.model_from_config``) -> parameters, without the training plan (no training settings checked, no
learning rate, no train step, no initialisation computed or traced). It reads only the network's variables,
in the checkpoint's own tree, checks them against the state digest written with them, and then against the
network by tracing its forward pass once (``trace_forward``, the trace ``predict`` compiles); ``bn-stats``,
which writes a new run from the whole state, restores that into ``state.abstract_state``'s shapes instead.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections

from resflax.errors import BadInput, RestoreError
from resflax.train import build, protocols, tasks
from resflax.train import state as state_lib
from resflax.train import step as step_lib
from resflax.train.checkpoint import Checkpointer


@dataclasses.dataclass(frozen=True)
class ReadPlan:
    """What reading a run needs besides its parameters (``loop.Plan``'s counterpart without training): its
    network, the devices it is read on, where its data is. A task made from it only evaluates (``build_eval``),
    hence no steps."""

    model: Any
    mesh: Any
    data_dir: str | None
    num_steps: int = 0


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
    f = Path(workdir) / "config.json"
    if not f.exists():
        raise BadInput(f"{workdir} holds no run (no config.json)")
    return ml_collections.ConfigDict(json.loads(f.read_text()))


def _saved_num_classes(workdir: str | Path) -> int | None:
    steps = sorted((int(d.name) for d in (Path(workdir) / "checkpoints").glob("*") if d.name.isdigit()), reverse=True)
    for step in steps:
        try:
            meta = json.loads((Path(workdir) / "checkpoints" / str(step) / "meta" / "metadata").read_text())
        except (OSError, ValueError):
            continue
        if meta.get("num_classes"):
            return int(meta["num_classes"])
    return None


def read(config: ml_collections.ConfigDict, locate_data: bool = True) -> ReadPlan:
    """``config``'s ``ReadPlan``: the dataset located (``locate_data``; else the number of classes is the
    config's), the model built, a mesh of ``config.num_devices`` devices (0: all). ``BadInput`` or
    ``DataError`` for what cannot be used."""
    try:
        if locate_data:
            data_dir, num_classes = tasks.locate(config)
        else:
            data_dir, num_classes = config.data_dir, config.get("num_classes")
        model = build.model_from_config(config, num_classes)
        mesh = step_lib.make_mesh(config.num_devices or jax.device_count())
    except (ValueError, TypeError, KeyError) as e:
        if isinstance(e, BadInput):
            raise
        raise BadInput(str(e).splitlines()[0] if str(e) else type(e).__name__) from e
    return ReadPlan(model, mesh, data_dir)


@dataclasses.dataclass(frozen=True)
class RunVariables:
    """What a reader takes from a checkpoint: its step, the network's variables (replicated over the read plan's
    mesh), their ``state_digest`` (checked against the one written with them) and the network's forward pass on
    them, traced for one image when they were checked against it (``trace_forward``; ``resflax predict``
    compiles it)."""

    step: int
    params: Any
    batch_stats: Any
    digest: str
    forward: Any = None


def restore(workdir: str | Path, config: ml_collections.ConfigDict | None = None, num_devices: int = 0,
            skipped: list[int] | None = None, locate_data: bool = True, purpose: str = "evaluate",
            whole: bool = False):
    """(config, ``ReadPlan``, variables) of the latest good checkpoint in ``workdir``, read-only; the steps of
    damaged checkpoints passed over are appended to ``skipped``. Without a checkpoint: ``BadInput`` saying
    that there is none to ``purpose``.

    The variables are a ``RunVariables``: only the parameters and BN statistics are read (as host arrays, in the
    checkpoint's own tree: nothing traced to restore them), checked against the checkpoint's state digest and
    then against the network (``trace_forward``: a ``RestoreError`` if they do not fit it). ``whole=True``:
    the whole train state (``TrainState``, as training restores it: its shapes from ``state.abstract_state``),
    for a reader that writes a new run from it (``resflax bn-stats``)."""
    config = config or load_config(workdir)
    config.num_devices = num_devices
    if not locate_data and "num_classes" in config and not config.num_classes:
        config.num_classes = _saved_num_classes(workdir)  # the dataset's, recorded with the checkpoints
    p = read(config, locate_data)
    abstract = None
    if whole:  # shapes only (no eager initialisation: restoring needs the tree, not its values)
        abstract = state_lib.abstract_state(p.model, state_lib.optimizer(config), config.seed,
                                            tasks.image_shape(config), config.warmup, p.mesh)
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        restored = ckpt.restore_latest(abstract)
    finally:
        ckpt.close()
    if skipped is not None:
        skipped.extend(ckpt.skipped)
    if restored is None:
        raise BadInput(f"{workdir} has no checkpoint to {purpose}")
    if whole:
        return config, p, restored[0]
    host, meta = restored
    v = RunVariables(host["step"], *step_lib.replicate((host["params"], host["batch_stats"]), p.mesh),
                     meta["state_digest"])
    return config, p, dataclasses.replace(v, forward=trace_forward(p.model, v, tasks.image_shape(config),
                                                                     str(workdir)))


def trace_forward(model, v: RunVariables, image_shape, where: str, batch: int = 1) -> jax.stages.Traced:
    """The network's evaluation forward pass (logits of ``batch`` images of ``image_shape``, float32) on ``v``'s
    variables, traced (not compiled): how a reader checks that a checkpoint's variables fit the network built
    from its config. A missing or misshapen variable (Flax's error while tracing) or one the network does not
    use raises ``RestoreError`` naming it; nothing is moved."""
    variables = {"params": v.params, "batch_stats": v.batch_stats}
    forward = jax.jit(lambda variables, x: model.apply(variables, x, train=False))
    x = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)

    def refused(what: str) -> RestoreError:
        return RestoreError(f"checkpoint {v.step} in {where} holds variables that do not fit the network its "
                            f"config builds ({what}): written by another version of resflax or for another "
                            "model; nothing was moved")

    try:
        traced = forward.trace(variables, x)
    except flax.errors.FlaxError as e:
        raise refused(str(e).splitlines()[0].split(" (https://")[0]) from e
    jaxpr = traced.jaxpr.jaxpr
    used = {id(a) for eqn in jaxpr.eqns for a in eqn.invars} | {id(a) for a in jaxpr.outvars}
    paths = jax.tree_util.tree_flatten_with_path(variables)[0]
    unused = [jax.tree_util.keystr(path) for (path, _), var in zip(paths, jaxpr.invars, strict=False)
              if id(var) not in used]
    if unused:
        raise refused(f"{len(unused)} unused, e.g. {unused[0]}")
    return traced


def evaluate_workdir(workdir: str | Path, data_dir: str | None = None, protocol: str = "center",
                     record: bool = False) -> dict[str, Any]:
    """Test error of the latest good checkpoint with a test ``protocol`` (``center``; ImageNet-style runs
    also ``10crop`` and ``multiscale``, see ``train.protocols``). ``record`` appends the result as one
    ``{"event": "eval", ...}`` line to the run's metrics.jsonl (the only write; off by default)."""
    if protocol not in protocols.PROTOCOLS:
        raise BadInput(f"protocol must be one of {', '.join(protocols.PROTOCOLS)}, got {protocol!r}")
    config = load_config(workdir)
    if data_dir:
        config.data_dir = data_dir
    if protocol != "center" and tasks.is_cifar(config):
        raise BadInput(f"protocol {protocol} is for ImageNet-style runs; CIFAR-10 is tested on whole images (center)")
    skipped: list[int] = []
    config, run, state = restore(workdir, config, skipped=skipped)
    task = tasks.create(config, run, lambda *a, **k: None)  # the data and its mean
    try:
        if protocol == "center":  # what training evaluates, by the same code
            task.build_eval(run.model)
            r = task.evaluate(state, splits=("test",))["test"]
        else:
            scales = tuple(config.get("multiscale_scales") or protocols.imagenet.MULTISCALE)
            r = protocols.ProtocolEvaluator(protocol, run.model, task.test, task.mean_host, task.cfg, scales=scales,
                                            std=task.std_host).run(state)
    finally:
        task.close()
    step = state.step
    out = {"workdir": str(workdir), "model": config.model, "step": step, "protocol": protocol,
           "test_error": r["error"]}
    if "loss" in r:
        out["test_loss"] = r["loss"]
    out["test_examples"] = r["count"]
    if "top5_error" in r:
        out["test_top5_error"] = r["top5_error"]
    out = {**out, "state_digest": state.digest, "skipped_damaged": skipped}
    if record and jax.process_index() == 0:
        line = {"step": step, "event": "eval", "protocol": protocol, "error": out["test_error"],
                "top5_error": out.get("test_top5_error"), "count": out["test_examples"]}
        with open(Path(workdir) / "metrics.jsonl", "a") as f:  # one append: safe beside a training writer
            f.write(json.dumps(line) + "\n")
    return out
