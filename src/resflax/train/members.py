"""The members of a run: the K >= 1 networks that ``train.loop`` trains together, their directories, configs,
status and the layout of their states.

A single run is one member (K = 1): its directory is the workdir and its state is the train state itself.
A population (``--config.population.seeds=0,1,2,3,4 --config.population.residual=0,1`` with
``model=resnet20``: plain-20 and ResNet-20 with five seeds each) is K > 1 CIFAR networks of one parameter
shape in one jitted step (``step.make_population_train_step``): on an accelerator one small network leaves
most of the device idle, K of them batched fill it. The option-A shortcut has no parameters, so plain-n and
ResNet-n have the same parameters and can share a program.

Every member of a population is a run of its own, the single run of its settings (``model``, ``seed``): its
own initialisation, data order and augmentation stream, and its own run directory
``WORKDIR/members/<model>-seed<s>`` holding ``config.json``, ``metrics.jsonl``, TensorBoard events and
checkpoints in the single run's format. So ``resflax eval``, ``report`` and ``responses`` work on a member's
directory, or on ``WORKDIR`` for all members, and ``resflax train --workdir WORKDIR/members/<name>`` continues
one member alone. With ``vectorize="loop"`` (the default on the CPU) a member's parameters equal its single
run's bit for bit.

The population's own files: ``WORKDIR/config.json`` (its config), ``population.json`` (members and their
status) and the lock. Checkpoints are written for every member at the same steps; a resumption restores every
member at the newest step all of them have, so an interruption between two members' saves loses nothing.

Divergence: a member of a population whose loss or parameters become non-finite stops alone (the loop writes
its ``{"event": "diverged"}`` line, ``population.json`` marks it ``diverged`` and a resumption leaves it
stopped); when every member has diverged the run ends with exit 3, as a single run does at its first
divergence. Populations run in one process (on all its devices; each member's batch is split over them as in
a single run).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resflax import configs
from resflax.errors import BadInput
from resflax.models.registry import parse_model_name
from resflax.train import tasks
from resflax.train import workdir as wd
from resflax.train.distributed import to_host

SINGLE = configs.ADDED_KEYS["population"]  # a single run's population settings


@dataclasses.dataclass(frozen=True)
class Member:
    name: str  # also its directory under WORKDIR/members
    model: str
    seed: int
    residual: bool | None  # None: the configured model as it is (a single run)


def configured(config) -> bool:
    """Whether the config names a population (K > 1 or a residual flag) rather than a single run."""
    pop = config.get("population")
    return bool(pop and (pop.get("seeds") or pop.get("residual")))


def members(config) -> list[Member]:
    """The members a population config names, residual flag major: plain members first, then residual ones."""
    pop = config.population
    parsed = parse_model_name(config.model)
    if parsed is None or parsed.prefix == "imagenet" or not tasks.is_cifar(config):
        raise BadInput(f"a population trains CIFAR-10 networks resnetN/plainN; got model {config.model!r} on "
                       f"{config.dataset}")
    kind, depth = parsed.kind, parsed.depth
    seeds = [int(s) for s in (pop.seeds or (config.seed,))]
    if len(set(seeds)) != len(seeds):
        raise BadInput(f"population.seeds repeats a seed: {tuple(pop.seeds)}")
    flags = [int(r) for r in (pop.residual or (int(kind == "resnet"),))]
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
    configs.check("population.vectorize", v)
    if v == "auto":
        return "loop" if jax.default_backend() == "cpu" else "vmap"
    return v


def check_single_process(config) -> None:
    """A population runs in one process: refused before any multi-process start-up."""
    if configured(config) and (config.get("distributed") or config.get("coordinator_address")
                               or (config.get("num_processes") or 1) > 1):
        raise BadInput("a population runs in one process (on all its devices); leave out the multi-process settings")


class Members:
    """The K members of one run (``config`` and its ``plan``, in ``root``). Everything the loop does per member
    goes through here: directories and configs, the population's status file, and the state layout (K = 1:
    the train state itself; K > 1: one state whose every leaf has a leading member axis)."""

    def __init__(self, config, plan, root: Path, cfg_dict: dict):
        self.root = root
        self.population = configured(config)
        if self.population:
            check_single_process(config)
            self.list = members(config)
            self.vectorize = resolve_vectorize(config.population.vectorize)
            shortcuts = {getattr(plan.model, "shortcut", "A")}
            if len({m.residual for m in self.list}) > 1 and shortcuts != {"A"}:
                raise BadInput(f"plain and residual members share parameters only with option-A shortcuts; got "
                               f"shortcut {plan.model.shortcut!r}")
            self.dirs = [root / "members" / m.name for m in self.list]
            self.configs = [member_config(cfg_dict, m) for m in self.list]
        else:
            self.list = [Member(config.model, config.model, config.seed, None)]
            self.vectorize = None
            self.dirs = [root]
            self.configs = [cfg_dict]
        self.K = len(self.list)
        self.status: dict[str, dict] = {}
        self._stack = self._take = None

    def __iter__(self):
        return iter(range(self.K))

    def models(self, model) -> list:
        return [model if m.residual is None else model.clone(residual=m.residual) for m in self.list]

    def name(self, k: int) -> str:
        """How messages name member ``k`` ("" for a single run)."""
        return f"{self.list[k].name}: " if self.population else ""

    # --- directories, configs and status (a population's; a single run's directory is the workdir) --------

    def take_directories(self, locks: list) -> None:
        """Creates each member's directory, refuses one holding another experiment and locks it (each lock is
        appended to ``locks`` as soon as it is held, for the caller to release)."""
        if not self.population:
            return
        for d, cfg in zip(self.dirs, self.configs):
            wd.prepare(d)
            wd.check_experiment(d, cfg)
            lock = wd.Lock(d)
            lock.acquire()
            locks.append(lock)

    def write_configs(self) -> None:
        """Each member directory's ``config.json`` (the settings in force), when new or changed."""
        if not self.population:
            return
        for d, cfg in zip(self.dirs, self.configs):
            if wd.resumable_changes(d, cfg) or not (d / "config.json").exists():
                wd.write_json_atomic(d / "config.json", cfg)

    def load_status(self) -> list[bool]:
        """Reads ``population.json`` (a diverged member stays stopped); returns which members are alive."""
        old: dict[str, dict] = {}
        f = self.root / "population.json"
        if self.population and f.exists():
            old = {m["name"]: m for m in json.loads(f.read_text())["members"]}
        self.status = {m.name: {"status": old.get(m.name, {}).get("status", "training"),
                                **({"diverged_at": old[m.name]["diverged_at"]} if "diverged_at" in old.get(m.name, {})
                                   else {})} for m in self.list}
        self.write_status()
        return [self.status[m.name]["status"] != "diverged" for m in self.list]

    def write_status(self) -> None:
        if not self.population:
            return
        wd.write_json_atomic(self.root / "population.json", {"members": [
            {"name": m.name, "dir": f"members/{m.name}", "model": m.model, "seed": m.seed, "residual": m.residual,
             **self.status[m.name]} for m in self.list]})

    def set_status(self, k: int, status: str, **extra) -> None:
        self.status[self.list[k].name] = {"status": status, **extra}
        self.write_status()

    # --- states ---------------------------------------------------------------------------------------------

    def restore(self, ckpts, abstract, alive: list[bool]) -> tuple[list, list[dict]]:
        """Each member's state at the newest step every training member has (None: start from the initial
        state); a stopped (diverged) member's at its own newest. Checkpoints of a training member newer than
        that step (a stop between two members' saves) are set aside."""
        states: list[Any] = [None] * self.K
        metas: list[dict] = [{}] * self.K
        for k in self:
            if not alive[k]:  # stays stopped: its last good state, or its initial one if it never saved
                got = ckpts[k].restore_latest(abstract)
                if got is not None:
                    states[k], metas[k] = got
        live = [k for k in self if alive[k]]
        limit = None
        while True:
            got = {k: ckpts[k].restore_latest(abstract, max_step=limit) for k in live}
            steps = {k: (int(to_host(g[0].step)) if g is not None else 0) for k, g in got.items()}
            common = min(steps.values(), default=0)
            if all(s == common for s in steps.values()):
                break
            limit = common
        if self.population:
            for k in live:  # saved after the others when the run stopped: written again, identically, on the way
                ckpts[k].set_aside_after(common, "ahead of the population's other members")
        for k, g in got.items():
            if g is not None:
                states[k], metas[k] = g
        return states, metas

    def combine(self, states: list, mesh):
        """The loop's state from the members' (device) states."""
        if not self.population:
            return states[0]
        if self._stack is None:
            rep = NamedSharding(mesh, P())
            self._stack = jax.jit(lambda trees: jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees),
                                  out_shardings=rep)
            self._take = jax.jit(lambda tree, k: jax.tree_util.tree_map(lambda a: a[k], tree), out_shardings=rep)
        return self._stack(states)

    def state(self, states, k: int):
        """Member ``k``'s state (on the devices) from the loop's state."""
        return self._take(states, k) if self.population else states

    def host(self, host_states, k: int):
        """Member ``k``'s part of a host copy of the loop's state (or of its metrics)."""
        return jax.tree_util.tree_map(lambda a: a[k], host_states) if self.population else host_states
