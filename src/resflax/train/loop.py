"""``train_and_evaluate(config, workdir)``: the training loop, the only one, as a library function. It owns the
order of a run: the plan (the config checked and turned into model, mesh and schedule before anything is
written), the workdir lock and ``config.json``, restoring, the step cadence (log, evaluate, save), warm-up and
lr-drop records, preemption by signals, divergence and the final result. It trains K >= 1 members
(``train.members``): a single run is K = 1, a population K > 1 in one program. What differs between
datasets (where batches come from, the device program, evaluation) is a task (``train.tasks``); the learning
rate is ``train.schedules``'; checkpoints and the run directory are ``train.checkpoint``/``train.workdir``'s.

Bad input is refused before anything is written: unknown model, bad settings (``resflax.configs``), a batch
that does not divide by the devices, missing or damaged data, a workdir in use or holding another experiment.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from resflax import configs
from resflax.errors import BadInput, DivergenceError
from resflax.interrupts import Interrupts
from resflax.train import build, distributed, schedules, tasks
from resflax.train import members as members_lib
from resflax.train import state as state_lib
from resflax.train import step as step_lib
from resflax.train import workdir as wd
from resflax.train.checkpoint import Checkpointer
from resflax.train.distributed import to_host


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
    build.compute_dtype(config)  # float16's own message before the generic checks
    configs.validate(config)  # every key's type, range and choices (resflax.configs.KEYS)
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
    build.check_bn_groups(config, ndev)
    mesh = step_lib.make_mesh(ndev)
    num_steps, boundaries, schedule = schedules.from_config(config)
    step_cfg = step_lib.StepConfig(batch_size=config.batch_size, schedule=schedule)
    return Plan(model, mesh, num_steps, boundaries, step_cfg, data_dir)


def _all_finite(host_tree) -> bool:
    return all(bool(np.all(np.isfinite(x))) for x in jax.tree_util.tree_leaves(host_tree))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, start_over: bool = False) -> dict[str, Any]:
    """Trains (or resumes) the run in ``workdir``: its K >= 1 members (``train.members``) in this one loop.

    A single run (K = 1) returns its final ``step``, ``test_error`` (``val_error`` with a held-out split),
    ``state_digest`` and ``finished``. A config naming a population (``population.seeds``/``population.residual``,
    K > 1) returns the same keys for the whole run (``test_error``/``state_digest`` None) and its members
    (name, dir, model, seed, step, test_error, state_digest, status) under ``members``.

    Multi-process (``distributed``/``coordinator_address`` in the config or ``RESFLAX_*`` in the environment):
    every process calls this with the same arguments; process 0 alone takes the workdir lock and writes
    ``config.json``, metrics and messages; all of them write and read the checkpoints together.
    """
    members_lib.check_single_process(config)
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
    # the members are known (and a bad population refused) before anything is written
    mem = members_lib.Members(config, p, Path(workdir).expanduser().absolute(), cfg_dict)
    is_main = jax.process_index() == 0
    path = wd.prepare(workdir)
    locks = [wd.Lock(path)] if is_main else []
    with Interrupts() as pre:  # the first signal: checkpoint after this step, then stop
        try:
            failed: BaseException | None = None
            if is_main:
                try:
                    locks[0].acquire()
                    if start_over:
                        moved = wd.set_aside(path)
                        if moved:
                            print(f"moved the previous run to {moved}", flush=True)
                        locks[0].release()
                        locks[0].acquire()
                    wd.check_experiment(path, cfg_dict)
                    mem.take_directories(locks)
                except Exception as e:  # noqa: BLE001 (re-raised below, after telling the other processes)
                    failed = e
            if jax.process_count() > 1:  # the others follow process 0's verdict instead of hanging
                ok = bool(multihost_utils.broadcast_one_to_all(np.int32(failed is None)))
                if not ok and failed is None:
                    raise wd.WorkdirError(f"process 0 could not use workdir {path} (its message says why)")
            if failed is not None:
                raise failed
            return _run(config, cfg_dict, p, mem, pre)
        finally:
            for lock in locks:
                lock.release()


def _record_resumption(writers: list, say, config, start: int, changes: dict, devices_before: int | None,
                       devices: int) -> None:
    """States (and records in every member's metrics.jsonl) what differs from the run's last start: changed
    resumable settings, and a different device count with its consequence for per-device BatchNorm."""
    if changes:
        for w in writers:
            w.write({"step": start, "event": "config", "changed": changes})
        say("settings changed since the last start: "
            + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))
    if devices_before is None or devices_before == devices:
        return
    if config.bn_sync:
        consequence = "BatchNorm statistics are global (bn_sync), so training goes on as before"
    elif config.get("bn_group_size"):
        consequence = (f"BatchNorm statistics are over groups of {config.bn_group_size} images (bn_group_size) on "
                       "any device count, so training goes on as before")
    else:
        consequence = (f"per-device BatchNorm now normalises over {config.batch_size // devices} images "
                       f"instead of {config.batch_size // devices_before}: the run continues correctly but "
                       "will not reproduce an uninterrupted run bit for bit")
    for w in writers:
        w.write({"step": start, "event": "devices_changed", "from": devices_before, "to": devices,
                 "consequence": consequence})
    say(f"note: resumed on {devices} devices, checkpoint {start} was written on {devices_before}; " + consequence)


def _run(config, cfg_dict, p: Plan, mem: members_lib.Members, pre: Interrupts) -> dict[str, Any]:
    is_main = jax.process_index() == 0
    say = functools.partial(print, flush=True) if is_main else (lambda *a, **k: None)
    path = mem.root
    # config.json always holds the settings in force; what a resumption changed goes into metrics.jsonl
    changes = wd.resumable_changes(path, cfg_dict) if is_main else {}
    if is_main and (changes or not (path / "config.json").exists()):
        wd.write_json_atomic(path / "config.json", cfg_dict)
    mem.write_configs()
    alive = mem.load_status()
    if not any(alive):
        raise DivergenceError("every member of this population has diverged; nothing left to train")
    if mem.population:
        say(f"population of {mem.K}: {', '.join(m.name for m in mem.list)} ({mem.vectorize}); one run directory "
            f"each under {path / 'members'}")
    last_boundary = max(p.boundaries, default=0)
    if p.num_steps < last_boundary:
        say(f"note: the run stops at step {p.num_steps}, before the learning rate drops at "
            f"{', '.join(str(b) for b in p.boundaries if b > p.num_steps)}: num_steps only ends a run early (a "
            "larger num_steps later resumes it); schedule_scale rescales the whole schedule")
    task = tasks.create(config, p, say)
    try:
        return _train(config, p, mem, pre, task, changes, alive, say)
    finally:
        task.close()


def _train(config, p: Plan, mem: members_lib.Members, pre: Interrupts, task, changes, alive: list[bool],
           say) -> dict[str, Any]:
    is_main = jax.process_index() == 0
    tx_fn = state_lib.optimizer(config)
    models = mem.models(p.model)

    def inits(k: int):
        """Member ``k``'s initial state, computed only for a member that restores no checkpoint: a resumed run
        initialises nothing (restoring needs the shapes alone)."""
        return state_lib.init_state(models[k], tx_fn, mem.list[k].seed, task.image_shape, config.warmup)

    abstract = state_lib.abstract_state(models[0], tx_fn, mem.list[0].seed, task.image_shape, config.warmup, p.mesh)
    tx = tx_fn(abstract.params)
    ckpts = [Checkpointer(d, keep=config.keep_checkpoints) for d in mem.dirs]
    writers: list[wd.MetricsWriter] = []
    try:
        return _loop(config, p, mem, pre, task, changes, alive, say, is_main, tx, inits, abstract, ckpts, writers)
    except BaseException:
        # Saves already started hold good states: let them finish, then report the first error.
        for c in ckpts:
            try:
                c.close()
            except Exception:  # noqa: BLE001 (the first error is the one reported)
                pass
        for w in writers:
            w.close()
        raise


def _loop(config, p: Plan, mem: members_lib.Members, pre: Interrupts, task, changes, alive: list[bool], say,
          is_main: bool, tx, inits, abstract, ckpts, writers) -> dict[str, Any]:
    K, mesh = mem.K, p.mesh
    restored, metas = mem.restore(ckpts, abstract, alive)
    states = mem.combine([s if s is not None else step_lib.replicate(inits(k), mesh) for k, s in enumerate(restored)],
                         mesh)
    first = next(k for k in mem if alive[k])
    start = max(int(to_host(s.step)) if s is not None else 0 for k, s in enumerate(restored) if alive[k])
    if restored[first] is not None:
        say(f"resumed from step {start}")

    if mem.population:
        task.build_population(p.model, tx, p.step_cfg, [m.residual for m in mem.list], mem.vectorize)
    else:
        task.build(p.model, tx, p.step_cfg)
    task.start(start, metas[first].get("input") if restored[first] is not None else None)
    plateau = schedules.plateau(config)  # a host-side lr rule: its state is saved with every checkpoint
    if plateau is not None and restored[first] is not None:
        saved = metas[first].get("lr", {}).get("plateau") or metas[first].get("input", {}).get("plateau")
        if saved is not None:  # (checkpoints written before 2026-12 kept it in the input record)
            plateau.load(saved)
    steps_per_epoch = task.steps_per_epoch
    eval_every = config.eval_every_steps or max(1, round(steps_per_epoch))
    devices = int(mesh.size)
    writers.extend(wd.MetricsWriter(d, enabled=is_main, resume_step=start) for d in mem.dirs)
    for k, w in enumerate(writers):
        w.write({"step": start, "event": "data", **task.event, "processes": jax.process_count(), "devices": devices,
                 **({"population": {"workdir": "../..", "member": k, "size": K, "vectorize": mem.vectorize}}
                    if mem.population else {})})
    _record_resumption(writers, say, config, start, changes,
                       metas[first].get("devices") if restored[first] is not None else None, devices)

    last_eval: list[dict[str, float]] = [{} for _ in mem]

    def diverge(k: int, step: int, why: str) -> None:
        """A single run stops at its first divergence; a population's member stops alone."""
        if not mem.population:
            raise DivergenceError(f"{why} at step {step}; last good checkpoint kept")
        alive[k] = False
        good = ckpts[k].steps()
        kept = f"its last good checkpoint is step {good[-1]}" if good else "it has no checkpoint"
        msg = (f"member {mem.list[k].name} diverged ({why} at step {step}): it stops here, {kept}; "
               f"{sum(alive)} of {K} members go on")
        writers[k].write({"step": step, "event": "diverged", "message": msg})
        mem.set_status(k, "diverged", diverged_at=step)
        say(msg)
        if not any(alive):
            raise DivergenceError(f"every member of the population diverged (the last at step {step}); "
                                  "each keeps its last good checkpoint")

    def run_eval(states, step: int) -> None:
        for k in mem:
            if not alive[k]:
                continue
            s = mem.state(states, k)
            results = task.evaluate(s, member=k) if mem.population else task.evaluate(s)
            for name, r in results.items():
                last_eval[k][name] = r["error"]
                writers[k].write({"step": step, "split": name, "error": r["error"], "loss": r["loss"],
                                  **({"top5_error": r["top5_error"]} if "top5_error" in r else {}),
                                  "epoch": step / steps_per_epoch})
            drop = plateau.observe(results, step) if plateau is not None else None
            if drop:
                writers[k].write({"step": step, "event": "lr_drop", "message": drop})
                say(drop)

    saved = [start]

    def save(states, step: int) -> None:
        host = to_host(states)
        for k in mem:
            if not alive[k]:
                continue
            hk = mem.host(host, k)
            if not _all_finite((hk.params, hk.batch_stats)):
                diverge(k, step, "non-finite parameters")
                continue
            meta = {"config": mem.configs[k], "step": step, "state_digest": state_lib.state_digest(hk),
                    "devices": devices, "processes": jax.process_count(), "input": task.input_state(step),
                    "num_classes": int(p.model.num_classes)}
            if plateau is not None:
                meta["lr"] = {"plateau": plateau.state()}
            if mem.population:
                meta["population"] = {"member": k, "size": K, "vectorize": mem.vectorize}
            ckpts[k].save(step, mem.state(states, k), meta, host_state=hk)
        saved[0] = step

    pending: list[tuple[int, Any]] = []
    warm_logged = [not config.warmup or (restored[k] is not None and not bool(to_host(restored[k].warmup_active)))
                   for k in mem]
    bar = _progress(config, start, p.num_steps)
    if bar is not None and mem.population:
        bar.set_description(f"{K} x {config.model}")
    t_last, n_last = time.time(), start
    step = start
    alive_dev, alive_sent = None, None
    # Stop on a signal: one process decides alone; several agree every preemption_check_every_steps steps, so
    # that all of them stop at, and checkpoint, the same step whichever of them received the signal.
    multi = jax.process_count() > 1
    check_every = config.get("preemption_check_every_steps", 10)  # configs written before the key existed
    stop = pre.requested and not multi
    while step < p.num_steps and not stop:
        if mem.population:
            if alive != alive_sent:  # a member diverged: from now on its state stays as it is
                alive_dev, alive_sent = step_lib.replicate(np.asarray(alive), mesh), list(alive)
            states, metrics = task.population_step(states, alive_dev)
        else:
            states, metrics = task.train_step(states, plateau.scale() if plateau is not None else 1.0)
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
        do_log = step % config.log_every_steps == 0 or step == p.num_steps
        do_eval = step % eval_every == 0 or step == p.num_steps
        do_save = step % config.checkpoint_every_steps == 0 or step == p.num_steps or stop
        if do_log or do_eval or do_save:
            fetched = to_host(pending)
            pending.clear()
            now = time.time()
            ips = (step - n_last) * config.batch_size / max(now - t_last, 1e-9)
            t_last, n_last = now, step
            warm = None
            for k in mem:
                if not alive[k]:
                    continue
                bad = next((s_i for s_i, m in fetched if not math.isfinite(float(mem.host(m["loss"], k)))), None)
                if bad is not None:
                    diverge(k, bad, "non-finite loss")
                    continue
                s_i, m = fetched[-1]
                rec = {"step": s_i, "split": "train",
                       "loss": float(np.mean([mem.host(f[1]["loss"], k) for f in fetched])),
                       "error": 100.0 * float(np.mean([mem.host(f[1]["error"], k) for f in fetched])),
                       "lr": float(mem.host(m["lr"], k)), "epoch": s_i / steps_per_epoch, "img_per_s": ips}
                if mem.population:
                    rec["population_img_per_s"] = ips * sum(alive)
                writers[k].write(rec)
                if not warm_logged[k]:
                    warm = warm or to_host((states.warmup_active, states.warmup_switch_step))
                    if not bool(mem.host(warm[0], k)):
                        sw = int(mem.host(warm[1], k))
                        writers[k].write({"step": sw, "event": "warmup_end"})
                        say(f"{mem.name(k)}warm-up ended: training error below {100 * config.warmup_until_error:.0f}%, "
                            f"lr back to {config.base_lr} from step {sw}")
                        warm_logged[k] = True
            if bar is not None:
                if mem.population:
                    errs = [100.0 * float(fetched[-1][1]["error"][k]) for k in mem if alive[k]]
                    bar.set_postfix_str(f"{ips * sum(alive):.0f} img/s, train err {min(errs):.1f}..{max(errs):.1f}%")
                else:
                    bar.set_postfix_str(f"ep {rec['epoch']:.1f} {ips:.0f} img/s loss {rec['loss']:.3f} "
                                        f"err {rec['error']:.1f}% lr {rec['lr']:.3g}"
                                        + (f" test {last_eval[0]['test']:.2f}%" if "test" in last_eval[0] else ""))
        if do_eval:
            run_eval(states, step)
        if do_save:
            save(states, step)
        if bar is not None:
            bar.update(1)
    if stop and step > start and saved[0] != step:  # the signal came after this step's save check
        save(states, step)
    for c in ckpts:
        c.wait()
    if bar is not None:
        bar.close()
    if stop and saved[0] == step and step > start:
        by = "" if pre.requested or not multi else " on another process"
        say(f"stopped by signal{by} at step {step}; checkpoint{'s' if mem.population else ''} written, rerun the "
            "same command to resume")
    elif pre.requested:
        latest = (f"the latest checkpoint is step {start}" if restored[first] is not None
                  else "there is no checkpoint yet")
        say(f"stopped by signal before the first step; nothing new to checkpoint ({latest}), rerun the same "
            "command to resume")
    if step >= p.num_steps and any(alive) and not all("test" in last_eval[k] for k in mem if alive[k]):
        run_eval(states, step)
    host = to_host(states)
    out = []
    for k, m in enumerate(mem.list):
        hk = mem.host(host, k)
        if mem.population and alive[k] and step >= p.num_steps:
            mem.status[m.name] = {"status": "finished"}
        out.append({"name": m.name, "dir": str(mem.dirs[k]), "model": m.model, "seed": m.seed, "step": int(hk.step),
                    "test_error": last_eval[k].get("test"), "val_error": last_eval[k].get("val"),
                    "state_digest": state_lib.state_digest(hk) if alive[k] else None,
                    "status": mem.status[m.name]["status"]})
    mem.write_status()
    for c in ckpts:
        c.close()
    for w in writers:
        w.close()
    stopped = {"stopped_by_signal": True} if pre.requested or stop else {}  # and said so above
    if not mem.population:
        result = {"step": out[0]["step"], "test_error": out[0]["test_error"], "state_digest": out[0]["state_digest"],
                  "finished": step >= p.num_steps, **stopped}
        if out[0]["val_error"] is not None:
            result["val_error"] = out[0]["val_error"]
        return result
    for o in out:
        o.pop("val_error")
    return {"step": step, "finished": step >= p.num_steps, "members": out, "test_error": None,
            "state_digest": None, **stopped}


def _progress(config, start: int, total: int):
    if not config.progress or jax.process_index() != 0:
        return None

    return tqdm(total=total, initial=start, desc=config.model, unit="step", dynamic_ncols=True, mininterval=2.0)
