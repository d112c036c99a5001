"""``train_and_evaluate(config, workdir)``: the CIFAR-10 training loop of the paper, as a library function.

Bad input is refused before anything is written: unknown model, bad dtype/weight-decay setting, a batch
that does not divide by the devices, missing data, a workdir in use or holding another experiment.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resflax.data import cifar10
from resflax.models import get_model
from resflax.train import schedules
from resflax.train import state as state_lib
from resflax.train import step as step_lib
from resflax.train import workdir as wd
from resflax.train.checkpoint import Checkpointer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class DivergenceError(RuntimeError):
    """The loss or the parameters became non-finite."""


@dataclasses.dataclass
class Plan:
    """Everything derived from the config before touching the workdir."""

    model: Any
    mesh: Any
    num_steps: int
    boundaries: tuple[int, ...]
    step_cfg: step_lib.StepConfig
    data_dir: str


def plan(config: ml_collections.ConfigDict) -> Plan:
    """Validates the config and derives the run's plan; raises ``ValueError``/``DataError`` on bad input."""
    if config.dataset != "cifar10":
        raise ValueError(f"dataset {config.dataset!r} is not supported by this loop (only 'cifar10')")
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    if config.weight_decay_on not in ("all", "kernels"):
        raise ValueError(f"weight_decay_on must be 'all' or 'kernels', got {config.weight_decay_on!r}")
    for key in ("batch_size", "num_steps", "eval_batch_size", "checkpoint_every_steps", "log_every_steps"):
        if config[key] <= 0:
            raise ValueError(f"{key} must be positive, got {config[key]}")
    overrides = dict(pad_layout=config.pad_layout, stride_on_3x3=config.stride_on_3x3,
                     zero_init_last_bn=config.zero_init_last_bn, dtype=DTYPES[config.dtype],
                     bn_axis_name=step_lib.AXIS if config.bn_sync else None)
    for key in ("shortcut", "impl"):
        if config.get(key) is not None:
            overrides[key] = config[key]
    model = get_model(config.model, **overrides)
    if model.stem != "cifar":
        raise ValueError(f"model {config.model!r} is an ImageNet model; CIFAR-10 needs a CIFAR model")
    ndev = config.num_devices or jax.device_count()
    if config.batch_size % ndev:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {ndev} devices")
    mesh = step_lib.make_mesh(ndev)
    scale = config.schedule_scale
    if scale <= 0:
        raise ValueError(f"schedule_scale must be positive, got {scale}")
    num_steps = schedules.scaled_steps(config.num_steps, scale)
    boundaries = tuple(schedules.scaled_steps(b, scale) for b in config.lr_boundaries)
    step_cfg = step_lib.step_config(
        boundaries,
        batch_size=config.batch_size,
        base_lr=config.base_lr,
        factor=config.lr_factor,
        warmup_lr=config.warmup_lr,
        warmup_until_error=config.warmup_until_error,
    )
    data_dir = cifar10.find_data_dir(config.data_dir)
    return Plan(model, mesh, num_steps, boundaries, step_cfg, data_dir)


class _Preemption:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit cleanly."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: give up at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _all_finite(tree) -> bool:
    return bool(jax.device_get(jax.tree_util.tree_reduce(
        lambda a, x: a & jnp.all(jnp.isfinite(x)), tree, jnp.asarray(True))))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, start_over: bool = False) -> dict[str, Any]:
    """Trains (or resumes) the run in ``workdir`` and returns its final ``step``, ``test_error``, ``state_digest``."""
    p = plan(config)
    cfg_dict = json.loads(config.to_json())
    path = wd.prepare(workdir)
    lock = wd.Lock(path)
    lock.acquire()
    try:
        if start_over:
            moved = wd.set_aside(path)
            if moved:
                print(f"moved the previous run to {moved}")
            lock.release()
            lock.acquire()
        wd.check_experiment(path, cfg_dict)
        return _run(config, cfg_dict, p, path)
    finally:
        lock.release()


def _run(config, cfg_dict, p: Plan, path: Path) -> dict[str, Any]:
    is_main = jax.process_index() == 0
    if is_main and not (path / "config.json").exists():
        (path / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
    t0 = time.time()
    data = cifar10.load(p.data_dir, config.val_examples)
    print(f"CIFAR-10 from {data.data_dir}: {len(data.train)} train / {len(data.test)} test"
          + (f" / {len(data.val)} val" if data.val else "") + f" (decoded in {time.time() - t0:.1f}s)", flush=True)

    tx_fn = functools.partial(state_lib.make_optimizer, momentum=config.momentum,
                              weight_decay=config.weight_decay, weight_decay_on=config.weight_decay_on)
    init = state_lib.init_state(p.model, tx_fn, config.seed, (32, 32, 3), config.warmup)
    tx = tx_fn(init.params)
    ckpt = Checkpointer(path, keep=config.keep_checkpoints)
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(
            p.mesh, jax.sharding.PartitionSpec())), init)
    restored = ckpt.restore_latest(abstract)
    if restored is not None:
        state, _ = restored
        print(f"resumed from step {int(state.step)}", flush=True)
    else:
        state = step_lib.replicate(init, p.mesh)
    start = int(jax.device_get(state.step))

    train_x, train_y, mean = step_lib.replicate((data.train.images, data.train.labels, data.mean), p.mesh)
    train_step = step_lib.make_train_step(p.model, tx, p.step_cfg, p.mesh)
    eval_step = step_lib.make_eval_step(p.model, p.mesh)
    steps_per_epoch = len(data.train) // config.batch_size
    eval_every = config.eval_every_steps or steps_per_epoch
    writer = wd.MetricsWriter(path, enabled=is_main, resume_step=start)

    def run_eval(s, step):
        out = {}
        for name, split in (("test", data.test), ("val", data.val)):
            if split is None:
                continue
            r = step_lib.evaluate(eval_step, s, split.images, split.labels, mean, config.eval_batch_size, p.mesh)
            out[name] = r["error"]
            writer.write({"step": step, "split": name, "error": r["error"], "loss": r["loss"],
                          "epoch": step / steps_per_epoch})
        return out

    def save(s, step):
        if not _all_finite(s.params):
            raise DivergenceError(f"non-finite parameters at step {step}; last good checkpoint kept")
        ckpt.save(step, s, {"config": cfg_dict, "step": step})

    pending: list[tuple[int, Any]] = []
    last_eval: dict[str, float] = {}
    warm_logged = bool(restored and not bool(jax.device_get(state.warmup_active)))
    bar = _progress(config, start, p.num_steps)
    t_last, n_last = time.time(), start
    with _Preemption() as pre:
        step = start
        while step < p.num_steps:
            state, metrics = train_step(state, train_x, train_y, mean)
            step += 1
            pending.append((step, metrics))
            boundary_log = step % config.log_every_steps == 0 or step == p.num_steps
            do_eval = step % eval_every == 0 or step == p.num_steps
            do_save = step % config.checkpoint_every_steps == 0 or step == p.num_steps or pre.requested
            if boundary_log or do_eval or do_save:
                fetched = jax.device_get(pending)
                pending.clear()
                now = time.time()
                ips = (step - n_last) * config.batch_size / max(now - t_last, 1e-9)
                t_last, n_last = now, step
                for s_i, m in fetched:
                    if not math.isfinite(float(m["loss"])):
                        raise DivergenceError(f"non-finite loss at step {s_i}; last good checkpoint kept")
                s_i, m = fetched[-1]
                rec = {"step": s_i, "split": "train", "loss": float(np.mean([f[1]["loss"] for f in fetched])),
                       "error": 100.0 * float(np.mean([f[1]["error"] for f in fetched])), "lr": float(m["lr"]),
                       "epoch": s_i / steps_per_epoch, "img_per_s": ips}
                writer.write(rec)
                if not warm_logged and config.warmup and not bool(jax.device_get(state.warmup_active)):
                    sw = int(jax.device_get(state.warmup_switch_step))
                    writer.write({"step": sw, "event": "warmup_end"})
                    print(f"warm-up ended: training error below {100 * config.warmup_until_error:.0f}%, "
                          f"lr back to {config.base_lr} from step {sw}", flush=True)
                    warm_logged = True
                if bar is not None:
                    bar.set_postfix_str(f"ep {rec['epoch']:.1f} {ips:.0f} img/s loss {rec['loss']:.3f} "
                                        f"err {rec['error']:.1f}% lr {rec['lr']:.3g}"
                                        + (f" test {last_eval['test']:.2f}%" if "test" in last_eval else ""))
            if do_eval:
                last_eval = run_eval(state, step)
            if do_save:
                save(state, step)
            if bar is not None:
                bar.update(1)
            if pre.requested:
                ckpt.wait()
                print(f"stopped by signal at step {step}; checkpoint written, rerun the same command to resume",
                      flush=True)
                break
    if bar is not None:
        bar.close()
    ckpt.wait()
    final_step = int(jax.device_get(state.step))
    if final_step >= p.num_steps and "test" not in last_eval:
        last_eval = run_eval(state, final_step)
    digest = state_lib.state_digest(state)
    result = {"step": final_step, "test_error": last_eval.get("test"), "state_digest": digest,
              "finished": final_step >= p.num_steps}
    if "val" in last_eval:
        result["val_error"] = last_eval["val"]
    ckpt.close()
    writer.close()
    return result


def _progress(config, start: int, total: int):
    if not config.progress or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, initial=start, desc=config.model, unit="step", dynamic_ncols=True, mininterval=2.0)
