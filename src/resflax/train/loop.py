"""``train_and_evaluate(config, workdir)``: the training loop of the paper for CIFAR-10 and ImageNet, as a
library function. What differs between the datasets (where batches come from, the train step, evaluation) is
a task (``train.tasks``); everything else here is shared.

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

from resflax.errors import BadInput, DivergenceError
from resflax.train import build, distributed, schedules, tasks
from resflax.train import state as state_lib
from resflax.train import step as step_lib
from resflax.train import workdir as wd
from resflax.train.checkpoint import Checkpointer
from resflax.train.distributed import to_host

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Plan:
    """Everything derived from the config before touching the workdir."""

    model: Any
    mesh: Any
    num_steps: int
    boundaries: tuple[int, ...]
    step_cfg: step_lib.StepConfig
    data_dir: str


def plan(config: ml_collections.ConfigDict, locate_data: bool = True) -> Plan:
    """Validates the config and derives the run's plan; raises ``BadInput``/``DataError`` on bad input.
    ``locate_data=False`` (weights in/out) builds the model without looking for the dataset."""
    try:
        return _plan(config, locate_data)
    except (ValueError, TypeError, KeyError) as e:  # validation of the config's values and the model's fields
        if isinstance(e, BadInput):
            raise
        raise BadInput(str(e).splitlines()[0] if str(e) else type(e).__name__) from e


def _plan(config: ml_collections.ConfigDict, locate_data: bool = True) -> Plan:
    if config.dtype == "float16":
        raise BadInput("dtype float16 needs loss scaling, which resflax does not implement; use bfloat16 (float32 "
                       "range, no scaling needed) or float32")
    if config.dtype not in DTYPES:
        raise BadInput(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    if config.weight_decay_on not in ("all", "kernels"):
        raise BadInput(f"weight_decay_on must be 'all' or 'kernels', got {config.weight_decay_on!r}")
    for key in ("batch_size", "num_steps", "eval_batch_size", "checkpoint_every_steps", "log_every_steps",
                "keep_checkpoints", "preemption_check_every_steps", "peer_timeout_s"):
        if config.get(key, 1) <= 0:
            raise BadInput(f"{key} must be positive, got {config[key]}")
    model = build.model_from_config(config)  # its settings checked before the data is looked for
    if locate_data:
        data_dir, num_classes = tasks.locate(config)
    else:
        data_dir, num_classes = config.data_dir, config.get("num_classes")
    if num_classes is not None:
        model = model.clone(num_classes=num_classes)
    tasks.validate(config, model)
    ndev = config.num_devices or jax.device_count()
    if config.batch_size % ndev:
        raise BadInput(f"batch_size {config.batch_size} is not divisible by the {ndev} devices")
    mesh = step_lib.make_mesh(ndev)
    scale = config.schedule_scale
    if scale <= 0:
        raise BadInput(f"schedule_scale must be positive, got {scale}")
    num_steps = schedules.scaled_steps(config.num_steps, scale)
    boundaries = tuple(schedules.scaled_steps(b, scale) for b in config.lr_boundaries)
    step_cfg = step_lib.step_config(
        boundaries,
        batch_size=config.batch_size,
        base_lr=tasks.peak_lr(config),
        factor=config.lr_factor,
        warmup_lr=config.warmup_lr,
        warmup_until_error=config.warmup_until_error,
    )
    return Plan(model, mesh, num_steps, boundaries, step_cfg, data_dir)


def _all_finite(host_tree) -> bool:
    return all(bool(np.all(np.isfinite(x))) for x in jax.tree_util.tree_leaves(host_tree))


class _Preemption:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit cleanly; a second signal gives up at once."""

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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, start_over: bool = False) -> dict[str, Any]:
    """Trains (or resumes) the run in ``workdir`` and returns its final ``step``, ``test_error``, ``state_digest``.

    Multi-process (``distributed``/``coordinator_address`` in the config or ``RESFLAX_*`` in the environment):
    every process calls this with the same arguments; process 0 alone takes the workdir lock and writes
    ``config.json``, metrics and messages; all of them write and read the checkpoints together.

    A config naming a population (``population.seeds``/``population.residual``) trains its members together
    (``train.population``); the result then lists them under ``members``.
    """
    from resflax.train import population  # noqa: PLC0415

    if population.configured(config):
        return population.train(config, workdir, start_over)
    distributed.maybe_initialize(config)
    with distributed.PeerWatch(distributed.peer_timeout(config)) as watch:
        try:
            return _train_and_evaluate(config, workdir, start_over)
        except Exception as e:
            if jax.process_count() > 1 and distributed.peer_lost(e):
                watch.die(f"a collective lost another process of this run ({str(e).splitlines()[0][:160]})")
            raise


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, start_over: bool) -> dict[str, Any]:
    p = plan(config)
    cfg_dict = json.loads(config.to_json())
    is_main = jax.process_index() == 0
    path = wd.prepare(workdir)
    lock = wd.Lock(path) if is_main else None
    with _Preemption() as pre:
        try:
            failed: BaseException | None = None
            if lock is not None:
                try:
                    lock.acquire()
                    if start_over:
                        moved = wd.set_aside(path)
                        if moved:
                            print(f"moved the previous run to {moved}", flush=True)
                        lock.release()
                        lock.acquire()
                    wd.check_experiment(path, cfg_dict)
                except Exception as e:  # noqa: BLE001 (re-raised below, after telling the other processes)
                    failed = e
            if jax.process_count() > 1:  # the others follow process 0's verdict instead of hanging
                from jax.experimental import multihost_utils  # noqa: PLC0415

                ok = bool(multihost_utils.broadcast_one_to_all(np.int32(failed is None)))
                if not ok and failed is None:
                    raise wd.WorkdirError(f"process 0 could not use workdir {path} (its message says why)")
            if failed is not None:
                raise failed
            return _run(config, cfg_dict, p, path, pre)
        finally:
            if lock is not None:
                lock.release()


def _record_resumption(writer: wd.MetricsWriter, say, config, start: int, changes: dict, devices_before: int | None,
                       devices: int) -> None:
    """States (and records in metrics.jsonl) what differs from the run's last start: changed resumable
    settings, and a different device count with its consequence for per-device BatchNorm."""
    if changes:
        writer.write({"step": start, "event": "config", "changed": changes})
        say("settings changed since the last start: "
            + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))
    if devices_before is None or devices_before == devices:
        return
    if config.bn_sync:
        consequence = "BatchNorm statistics are global (bn_sync), so training goes on as before"
    else:
        consequence = (f"per-device BatchNorm now normalises over {config.batch_size // devices} images "
                       f"instead of {config.batch_size // devices_before}: the run continues correctly but "
                       "will not reproduce an uninterrupted run bit for bit")
    writer.write({"step": start, "event": "devices_changed", "from": devices_before, "to": devices,
                  "consequence": consequence})
    say(f"note: resumed on {devices} devices, checkpoint {start} was written on {devices_before}; " + consequence)


def _run(config, cfg_dict, p: Plan, path: Path, pre: _Preemption) -> dict[str, Any]:
    is_main = jax.process_index() == 0
    say = functools.partial(print, flush=True) if is_main else (lambda *a, **k: None)
    # config.json always holds the settings in force; what a resumption changed goes into metrics.jsonl
    changes = wd.resumable_changes(path, cfg_dict) if is_main else {}
    if is_main and (changes or not (path / "config.json").exists()):
        wd.write_json_atomic(path / "config.json", cfg_dict)
    last_boundary = max(p.boundaries, default=0)
    if p.num_steps < last_boundary:
        say(f"note: the run stops at step {p.num_steps}, before the learning rate drops at "
            f"{', '.join(str(b) for b in p.boundaries if b > p.num_steps)}: num_steps only ends a run early (a "
            "larger num_steps later resumes it); schedule_scale rescales the whole schedule")
    task = tasks.create(config, p, say)
    try:
        return _run_task(config, cfg_dict, p, path, pre, task, changes, say)
    finally:
        task.close()


def _run_task(config, cfg_dict, p: Plan, path: Path, pre: _Preemption, task, changes, say) -> dict[str, Any]:
    is_main = jax.process_index() == 0

    tx_fn = state_lib.optimizer(config)
    init = state_lib.init_state(p.model, tx_fn, config.seed, task.image_shape, config.warmup)
    tx = tx_fn(init.params)
    ckpt = Checkpointer(path, keep=config.keep_checkpoints)
    abstract = state_lib.abstract_state(p.model, tx_fn, config.seed, task.image_shape, config.warmup, p.mesh, init)
    restored = ckpt.restore_latest(abstract)
    devices_before, meta = None, {}
    if restored is not None:
        state, meta = restored
        devices_before = meta.get("devices")
        say(f"resumed from step {int(to_host(state.step))}")
    else:
        state = step_lib.replicate(init, p.mesh)
    start = int(to_host(state.step))

    task.build(p.model, tx, p.step_cfg)
    task.start(start, meta.get("input") if restored is not None else None)
    steps_per_epoch = task.steps_per_epoch
    eval_every = config.eval_every_steps or max(1, round(steps_per_epoch))
    writer = wd.MetricsWriter(path, enabled=is_main, resume_step=start)
    writer.write({"step": start, "event": "data", **task.event,
                  "processes": jax.process_count(), "devices": int(p.mesh.size)})
    _record_resumption(writer, say, config, start, changes, devices_before, int(p.mesh.size))

    def run_eval(s, step):
        out = {}
        results = task.evaluate(s)
        for name, r in results.items():
            out[name] = r["error"]
            writer.write({"step": step, "split": name, "error": r["error"], "loss": r["loss"],
                          **({"top5_error": r["top5_error"]} if "top5_error" in r else {}),
                          "epoch": step / steps_per_epoch})
        drop = task.after_eval(results, step)
        if drop:
            writer.write({"step": step, "event": "lr_drop", "message": drop})
            say(drop)
        return out

    saved = [start]

    def save(s, step):
        host = to_host(s)
        if not _all_finite((host.params, host.batch_stats)):
            raise DivergenceError(f"non-finite parameters at step {step}; last good checkpoint kept")
        ckpt.save(step, s, {"config": cfg_dict, "step": step, "state_digest": state_lib.state_digest(host),
                            "devices": int(p.mesh.size), "processes": jax.process_count(),
                            "input": task.input_state(step), "num_classes": int(p.model.num_classes)},
                  host_state=host)
        saved[0] = step

    pending: list[tuple[int, Any]] = []
    last_eval: dict[str, float] = {}
    warm_logged = bool(restored and not bool(to_host(state.warmup_active)))
    bar = _progress(config, start, p.num_steps)
    t_last, n_last = time.time(), start
    step = start
    # Stop on a signal: one process decides alone; several agree every preemption_check_every_steps steps, so
    # that all of them stop at, and checkpoint, the same step whichever of them received the signal.
    multi = jax.process_count() > 1
    check_every = config.get("preemption_check_every_steps", 10)  # configs written before the key existed
    stop = pre.requested and not multi
    try:
        while step < p.num_steps and not stop:
            state, metrics = task.train_step(state)
            step += 1
            if not multi:
                stop = pre.requested
            elif step % check_every == 0 or step == p.num_steps:
                stop = distributed.any_process(pre.requested)
            pending.append((step, metrics))
            if len(pending) >= 2:
                # Keep one step in flight, no more: the device stays busy while the progress bar (and the
                # queue of dispatched steps) follows the steps actually computed.
                jax.block_until_ready(pending[-2][1]["loss"])
            boundary_log = step % config.log_every_steps == 0 or step == p.num_steps
            do_eval = step % eval_every == 0 or step == p.num_steps
            do_save = step % config.checkpoint_every_steps == 0 or step == p.num_steps or stop
            if boundary_log or do_eval or do_save:
                fetched = to_host(pending)
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
                if not warm_logged and config.warmup and not bool(to_host(state.warmup_active)):
                    sw = int(to_host(state.warmup_switch_step))
                    writer.write({"step": sw, "event": "warmup_end"})
                    say(f"warm-up ended: training error below {100 * config.warmup_until_error:.0f}%, "
                        f"lr back to {config.base_lr} from step {sw}")
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
        if stop and step > start and saved[0] != step:  # the signal came after this step's save check
            save(state, step)
        ckpt.wait()
    except BaseException:
        # Saves already started hold good states: let them finish, then report the first error.
        try:
            ckpt.close()
        except Exception:  # noqa: BLE001
            pass
        writer.close()
        raise
    if bar is not None:
        bar.close()
    if stop and saved[0] == step and step > start:
        by = "" if pre.requested or not multi else " on another process"
        say(f"stopped by signal{by} at step {step}; checkpoint written, rerun the same command to resume")
    elif pre.requested:
        latest = f"the latest checkpoint is step {start}" if restored is not None else "there is no checkpoint yet"
        say(f"stopped by signal before the first step; nothing new to checkpoint ({latest}), rerun the same "
            "command to resume")
    final_step = int(to_host(state.step))
    if final_step >= p.num_steps and "test" not in last_eval:
        last_eval = run_eval(state, final_step)
    digest = state_lib.state_digest(to_host(state))
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
