"""Populations: several CIFAR networks of one parameter shape trained together in one compiled program.

``--config.population.seeds=0,1,2,3,4 --config.population.residual=0,1`` with ``model=resnet20`` trains ten
networks, plain-20 and ResNet-20 with five seeds each, in one jitted step (``step.make_population_train_step``):
on an accelerator one small network leaves most of the device idle, K of them batched fill it. The
option-A shortcut has no parameters, so plain-n and ResNet-n have the same parameters and can share a program.

Every member is a run of its own, the single run of its settings (``model``, ``seed``): its own initialisation,
data order and augmentation stream, and its own run directory ``WORKDIR/members/<model>-seed<s>`` holding
``config.json``, ``metrics.jsonl``, TensorBoard events and checkpoints in the single run's format. So
``resflax eval``, ``report`` and ``responses`` work on a member's directory, or on ``WORKDIR`` for all members,
and ``resflax train --workdir WORKDIR/members/<name>`` continues one member alone. With ``vectorize="loop"``
(the default on the CPU) a member's parameters equal its single run's bit for bit.

The population's own files: ``WORKDIR/config.json`` (its config), ``population.json`` (members and their
status) and the lock. Checkpoints are written for every member at the same steps; a resumption restores every
member at the newest step all of them have, so an interruption between two members' saves loses nothing.

Divergence: a member whose loss or parameters become non-finite stops alone. It keeps its last good checkpoint,
its ``metrics.jsonl`` gets an ``{"event": "diverged"}`` line, ``population.json`` marks it ``diverged`` (a
resumption leaves it stopped), and the others go on. When every member has diverged the run ends with exit 3,
as a single run does.

Populations run in one process (on all its devices; each member's batch is split over them as in a single run).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resflax.errors import BadInput, DivergenceError
from resflax.train import state as state_lib
from resflax.train import step as step_lib
from resflax.train import tasks
from resflax.train import workdir as wd
from resflax.train.checkpoint import Checkpointer
from resflax.train.distributed import to_host

VECTORIZE = ("auto", "vmap", "loop")
SINGLE = {"seeds": [], "residual": [], "vectorize": "auto"}  # a single run's population settings
_NAME = re.compile(r"^(?:cifar_)?(resnet|plain)(\d+)$")


@dataclasses.dataclass(frozen=True)
class Member:
    name: str  # also its directory under WORKDIR/members
    model: str
    seed: int
    residual: bool


def configured(config) -> bool:
    pop = config.get("population")
    return bool(pop and (pop.get("seeds") or pop.get("residual")))


def members(config) -> list[Member]:
    """The members a config names, residual flag major: plain members first, then residual ones."""
    pop = config.population
    m = _NAME.match(config.model)
    if not m or not tasks.is_cifar(config):
        raise BadInput(f"a population trains CIFAR-10 networks resnetN/plainN; got model {config.model!r} on "
                       f"{config.dataset}")
    depth = int(m.group(2))
    seeds = [int(s) for s in (pop.seeds or (config.seed,))]
    if len(set(seeds)) != len(seeds):
        raise BadInput(f"population.seeds repeats a seed: {tuple(pop.seeds)}")
    flags = [int(r) for r in (pop.residual or (int(m.group(1) == "resnet"),))]
    if any(r not in (0, 1) for r in flags) or len(set(flags)) != len(flags):
        raise BadInput(f"population.residual must be 0 (plain), 1 (residual) or both 0,1; got {tuple(pop.residual)}")
    out = []
    for r in flags:
        model = f"{'resnet' if r else 'plain'}{depth}"
        out.extend(Member(f"{model}-seed{s}", model, s, bool(r)) for s in seeds)
    return out


def member_config(cfg_dict: dict, member: Member) -> dict:
    """The single run's config of a member (what ``experiments/cifar10.py:<model>,seed=<s>`` with the same
    other settings gives)."""
    out = json.loads(json.dumps(cfg_dict))
    out.update(model=member.model, seed=member.seed, population=dict(SINGLE))
    return out


def resolve_vectorize(v: str) -> str:
    if v not in VECTORIZE:
        raise BadInput(f"population.vectorize must be one of {VECTORIZE}, got {v!r}")
    if v == "auto":
        return "loop" if jax.default_backend() == "cpu" else "vmap"
    return v


def validate(config, plan) -> list[Member]:
    mem = members(config)
    resolve_vectorize(config.population.vectorize)
    if config.get("distributed") or config.get("coordinator_address") or (config.get("num_processes") or 1) > 1:
        raise BadInput("a population runs in one process (on all its devices); leave out the multi-process settings")
    shortcuts = {getattr(plan.model, "shortcut", "A")}
    if len({m.residual for m in mem}) > 1 and shortcuts != {"A"}:
        raise BadInput(f"plain and residual members share parameters only with option-A shortcuts; got "
                       f"shortcut {plan.model.shortcut!r}")
    return mem


def _stack(mesh):
    rep = NamedSharding(mesh, P())
    return jax.jit(lambda trees: jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees), out_shardings=rep)


def _take(mesh):
    rep = NamedSharding(mesh, P())
    return jax.jit(lambda tree, k: jax.tree_util.tree_map(lambda a: a[k], tree), out_shardings=rep)


def train(config, workdir: str, start_over: bool = False) -> dict[str, Any]:
    """Trains (or resumes) a population in ``workdir``; returns the population's result with a ``members``
    list (name, dir, step, test_error, state_digest, status)."""
    from resflax.train import loop  # noqa: PLC0415

    p = loop.plan(config)
    mem = validate(config, p)
    cfg_dict = json.loads(config.to_json())
    root = wd.prepare(workdir)
    locks = [wd.Lock(root)]
    with loop._Preemption() as pre:
        try:
            locks[0].acquire()
            if start_over:
                moved = wd.set_aside(root)
                if moved:
                    print(f"moved the previous run to {moved}", flush=True)
                locks[0].release()
                locks[0].acquire()
            wd.check_experiment(root, cfg_dict)
            dirs = [wd.prepare(root / "members" / m.name) for m in mem]
            for m, d in zip(mem, dirs):
                wd.check_experiment(d, member_config(cfg_dict, m))
                locks.append(wd.Lock(d))
                locks[-1].acquire()
            return _Run(config, cfg_dict, p, root, mem, dirs, pre).run()
        finally:
            for lock in locks:
                lock.release()


class _Run:
    def __init__(self, config, cfg_dict, p, root: Path, mem: list[Member], dirs: list[Path], pre):
        self.config, self.cfg_dict, self.p, self.root, self.mem, self.dirs, self.pre = (
            config, cfg_dict, p, root, mem, dirs, pre)
        self.K = len(mem)
        self.say = functools.partial(print, flush=True)
        self.vectorize = resolve_vectorize(config.population.vectorize)

    # --- population.json -------------------------------------------------------------------------------------

    def _read_status(self) -> dict[str, dict]:
        f = self.root / "population.json"
        if not f.exists():
            return {}
        return {m["name"]: m for m in json.loads(f.read_text())["members"]}

    def _write_status(self) -> None:
        wd.write_json_atomic(self.root / "population.json", {"members": [
            {"name": m.name, "dir": f"members/{m.name}", "model": m.model, "seed": m.seed, "residual": m.residual,
             **self.status[m.name]} for m in self.mem]})

    # --- the run -----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        config, p, root, say = self.config, self.p, self.root, self.say
        changes = wd.resumable_changes(root, self.cfg_dict)
        if changes or not (root / "config.json").exists():
            wd.write_json_atomic(root / "config.json", self.cfg_dict)
        for m, d in zip(self.mem, self.dirs):
            mcfg = member_config(self.cfg_dict, m)
            if wd.resumable_changes(d, mcfg) or not (d / "config.json").exists():
                wd.write_json_atomic(d / "config.json", mcfg)
        old = self._read_status()
        self.status = {m.name: {"status": old.get(m.name, {}).get("status", "training"),
                                **({"diverged_at": old[m.name]["diverged_at"]} if "diverged_at" in old.get(m.name, {})
                                   else {})} for m in self.mem}
        self._write_status()
        say(f"population of {self.K}: {', '.join(m.name for m in self.mem)} ({self.vectorize}); one run directory "
            f"each under {root / 'members'}")
        if p.num_steps < max(p.boundaries, default=0):
            say(f"note: the run stops at step {p.num_steps}, before the learning rate drops at "
                f"{', '.join(str(b) for b in p.boundaries if b > p.num_steps)}")
        task = tasks.CifarTask(config, p, say)
        try:
            return self._train(task, changes)
        finally:
            task.close()

    def _restore(self, ckpts, abstract, alive: list[bool]):
        """Each member's state at the newest step every training member has (None: start from the initial
        state); a stopped (diverged) member's at its own newest. Checkpoints of a training member newer than that
        step (a stop between two members' saves) are set aside."""
        states: list[Any] = [None] * self.K
        metas: list[dict] = [{}] * self.K
        for k in range(self.K):
            if not alive[k]:  # stays stopped: its last good state, or its initial one if it never saved
                got = ckpts[k].restore_latest(abstract)
                if got is not None:
                    states[k], metas[k] = got
        live = [k for k in range(self.K) if alive[k]]
        limit = None
        while True:
            got = {k: ckpts[k].restore_latest(abstract, max_step=limit) for k in live}
            steps = {k: (int(to_host(g[0].step)) if g is not None else 0) for k, g in got.items()}
            common = min(steps.values(), default=0)
            if all(s == common for s in steps.values()):
                break
            limit = common
        for k in live:  # saved after the others when the run stopped: written again, identically, on the way
            ckpts[k].set_aside_after(common, "ahead of the population's other members")
        for k, g in got.items():
            if g is not None:
                states[k], metas[k] = g
        return states, metas

    def _train(self, task, changes) -> dict[str, Any]:
        config, p, mesh = self.config, self.p, self.p.mesh
        tx_fn = state_lib.optimizer(config)
        models = [p.model.clone(residual=m.residual) for m in self.mem]
        inits = [state_lib.init_state(models[k], tx_fn, m.seed, task.image_shape, config.warmup)
                 for k, m in enumerate(self.mem)]
        tx = tx_fn(inits[0].params)
        abstract = state_lib.abstract_state(models[0], tx_fn, self.mem[0].seed, task.image_shape, config.warmup,
                                            mesh, inits[0])
        ckpts = [Checkpointer(d, keep=config.keep_checkpoints) for d in self.dirs]
        try:
            return self._loop(task, tx, inits, ckpts, abstract, changes)
        except BaseException:
            for c in ckpts:
                try:
                    c.close()
                except Exception:  # noqa: BLE001 (the first error is the one reported)
                    pass
            raise

    def _loop(self, task, tx, inits, ckpts, abstract, changes) -> dict[str, Any]:
        config, p, say, K, pre = self.config, self.p, self.say, self.K, self.pre
        mesh = p.mesh
        stack, take = _stack(mesh), _take(mesh)
        alive = [self.status[m.name]["status"] != "diverged" for m in self.mem]
        if not any(alive):
            raise DivergenceError("every member of this population has diverged; nothing left to train")
        restored, _ = self._restore(ckpts, abstract, alive)
        states = stack([s if s is not None else step_lib.replicate(inits[k], mesh) for k, s in enumerate(restored)])
        start = max(int(to_host(s.step)) if s is not None else 0 for k, s in enumerate(restored) if alive[k])
        if start:
            say(f"resumed from step {start}")
        alive_dev = step_lib.replicate(np.asarray(alive), mesh)
        alive_sent = list(alive)
        task.build_population(p.model, tx, p.step_cfg, [m.residual for m in self.mem], self.vectorize)
        steps_per_epoch = task.steps_per_epoch
        eval_every = config.eval_every_steps or max(1, round(steps_per_epoch))
        writers = [wd.MetricsWriter(d, resume_step=start) for d in self.dirs]
        for k, w in enumerate(writers):
            w.write({"step": start, "event": "data", **task.event, "processes": 1, "devices": int(mesh.size),
                     "population": {"workdir": "../..", "member": k, "size": K, "vectorize": self.vectorize}})
            if changes:
                w.write({"step": start, "event": "config", "changed": changes})
        if changes:
            say("settings changed since the last start: "
                + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))

        last_eval: list[dict] = [{} for _ in range(K)]
        saved = [start]
        warm_logged = [not config.warmup or (restored[k] is not None and not bool(to_host(restored[k].warmup_active)))
                       for k in range(K)]

        def member_state(k):
            return take(states, k)

        def diverge(k, step, why):
            alive[k] = False
            good = ckpts[k].steps()
            kept = f"its last good checkpoint is step {good[-1]}" if good else "it has no checkpoint"
            msg = (f"member {self.mem[k].name} diverged ({why} at step {step}): it stops here, {kept}; "
                   f"{sum(alive)} of {K} members go on")
            writers[k].write({"step": step, "event": "diverged", "message": msg})
            self.status[self.mem[k].name] = {"status": "diverged", "diverged_at": step}
            self._write_status()
            say(msg)
            if not any(alive):
                raise DivergenceError(f"every member of the population diverged (the last at step {step}); "
                                      "each keeps its last good checkpoint")

        def run_eval(step):
            for k in range(K):
                if not alive[k]:
                    continue
                results = task.evaluate(member_state(k), member=k)
                for name, r in results.items():
                    last_eval[k][name] = r["error"]
                    writers[k].write({"step": step, "split": name, "error": r["error"], "loss": r["loss"],
                                      "epoch": step / steps_per_epoch})

        def save(step):
            host = to_host(states)
            for k in range(K):
                if not alive[k]:
                    continue
                hk = jax.tree_util.tree_map(lambda a, k=k: a[k], host)
                if not all(bool(np.all(np.isfinite(x))) for x in jax.tree_util.tree_leaves((hk.params,
                                                                                             hk.batch_stats))):
                    diverge(k, step, "non-finite parameters")
                    continue
                mcfg = member_config(self.cfg_dict, self.mem[k])
                ckpts[k].save(step, member_state(k), {
                    "config": mcfg, "step": step, "state_digest": state_lib.state_digest(hk),
                    "devices": int(mesh.size), "processes": 1, "input": task.input_state(step),
                    "num_classes": int(p.model.num_classes),
                    "population": {"member": k, "size": K, "vectorize": self.vectorize}}, host_state=hk)
            saved[0] = step

        from resflax.train.loop import _progress  # noqa: PLC0415

        bar = _progress(config, start, p.num_steps)
        if bar is not None:
            bar.set_description(f"{K} x {config.model}")
        pending: list[tuple[int, Any]] = []
        t_last, n_last = time.time(), start
        step = start
        stop = pre.requested
        try:
            while step < p.num_steps and not stop:
                if alive != alive_sent:  # a member diverged: from now on its state stays as it is
                    alive_dev, alive_sent = step_lib.replicate(np.asarray(alive), mesh), list(alive)
                states, metrics = task.population_step(states, alive_dev)
                step += 1
                stop = pre.requested
                pending.append((step, metrics))
                if len(pending) >= 2:
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
                    warm = to_host(states.warmup_active), to_host(states.warmup_switch_step)
                    for k in range(K):
                        if not alive[k]:
                            continue
                        bad = next((s for s, m in fetched if not math.isfinite(float(m["loss"][k]))), None)
                        if bad is not None:
                            diverge(k, bad, "non-finite loss")
                            continue
                        s_i, m = fetched[-1]
                        writers[k].write({
                            "step": s_i, "split": "train",
                            "loss": float(np.mean([f[1]["loss"][k] for f in fetched])),
                            "error": 100.0 * float(np.mean([f[1]["error"][k] for f in fetched])),
                            "lr": float(m["lr"][k]), "epoch": s_i / steps_per_epoch, "img_per_s": ips,
                            "population_img_per_s": ips * sum(alive)})
                        if not warm_logged[k] and not bool(warm[0][k]):
                            sw = int(warm[1][k])
                            writers[k].write({"step": sw, "event": "warmup_end"})
                            say(f"{self.mem[k].name}: warm-up ended, lr back to {config.base_lr} from step {sw}")
                            warm_logged[k] = True
                    if bar is not None:
                        errs = [100.0 * float(fetched[-1][1]["error"][k]) for k in range(K) if alive[k]]
                        bar.set_postfix_str(f"{ips * sum(alive):.0f} img/s, train err {min(errs):.1f}.."
                                            f"{max(errs):.1f}%")
                if do_eval:
                    run_eval(step)
                if do_save:
                    save(step)
                if bar is not None:
                    bar.update(1)
            if stop and step > start and saved[0] != step:
                save(step)
            for c in ckpts:
                c.wait()
        except BaseException:
            for w in writers:
                w.close()
            raise
        if bar is not None:
            bar.close()
        if stop and saved[0] == step and step > start:
            say(f"stopped by signal at step {step}; checkpoints written, rerun the same command to resume")
        final_step = step
        if final_step >= p.num_steps and any(alive) and not all("test" in last_eval[k] for k in range(K) if alive[k]):
            run_eval(final_step)
        host = to_host(states)
        out_members = []
        for k, m in enumerate(self.mem):
            hk = jax.tree_util.tree_map(lambda a, k=k: a[k], host)
            if alive[k] and final_step >= p.num_steps:
                self.status[m.name] = {"status": "finished"}
            out_members.append({"name": m.name, "dir": str(self.dirs[k]), "model": m.model, "seed": m.seed,
                                "step": int(hk.step), "test_error": last_eval[k].get("test"),
                                "state_digest": state_lib.state_digest(hk) if alive[k] else None,
                                "status": self.status[m.name]["status"]})
        self._write_status()
        for c in ckpts:
            c.close()
        for w in writers:
            w.close()
        return {"step": final_step, "finished": final_step >= p.num_steps, "members": out_members,
                "test_error": None, "state_digest": None}
