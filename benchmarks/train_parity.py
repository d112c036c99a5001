"""Training parity with PyTorch: resflax's train step and a PyTorch reference trained side by side, in lock step.

    python benchmarks/train_parity.py --model resnet20 --steps 2000 --boundaries 1000,1500

Both frameworks start from the *same* initial weights (resflax's He init, copied into
``benchmarks/torch_reference.py``'s network, which has resflax's option-A layout: zero channels appended) and
see the *same* batches: before each step the batch that resflax's jitted step is about to draw (its permutation
of the seed, its crops and flips, ``resflax.train.step``'s own functions on the same state fields) is drawn on
the host and handed to PyTorch as NCHW float32. Each framework then runs its own recipe:

* resflax: ``resflax.train.step.make_train_step`` with ``state.make_optimizer`` (weight decay on every
  parameter, then momentum), the lr of ``schedules.learning_rate`` and its warm-up bookkeeping, models built with
  ``bn_unbiased_var=True`` (running variance from the unbiased batch variance, as PyTorch; see ``--biased``);
* PyTorch: ``torch.optim.SGD(momentum, weight_decay, dampening=0, nesterov=False)``, ``F.cross_entropy`` (mean),
  ``nn.BatchNorm2d(eps=1e-5, momentum=0.1)``, and the paper's schedule and ResNet-110 warm-up rule written here
  independently (lr = warmup_lr until an exponential average of the training error, started at 0.9, falls
  below warmup_until_error, then base_lr divided by ``1/factor`` at each boundary).

Three comparisons run in lock step (``run``): free runs (PyTorch trains on its own; per step both losses,
training errors and lrs, and the relative differences of parameters and BN running statistics), single steps
(every ``--forced_every`` steps a second PyTorch network is re-synchronised to resflax's state and takes that
one step: equal transitions from every visited state, at float32 tolerance, which free runs cannot show past
the first steps because two float32 trainings drift apart chaotically at lr 0.1), and a control (PyTorch
against PyTorch channels-last, for ``--control_steps``) showing that drift within one framework. It writes the
records (JSON) and a plot into ``--out`` (default ``docs/parity``) and prints a summary; see docs/parity.md.
``tests/test_torch_parity.py`` runs the single-step comparison at every step for 100 steps.
Needs the ``torch`` extra and CIFAR-10 (``TFDS_DATA_DIR`` or ``--data_dir``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from resflax import weights
from resflax.data import augment, cifar10
from resflax.models import get_model  # sets resflax's XLA flags (before any JAX computation)
from resflax.train import state as state_lib
from resflax.train import step as step_lib

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_reference import build_model  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The paper's CIFAR recipe (Sec. 4.2), in PyTorch's conventions (``bn_momentum`` 0.1 = Flax's 0.9)."""

    base_lr: float = 0.1
    boundaries: tuple[int, ...] = (32_000, 48_000)
    factor: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bn_momentum: float = 0.1
    warmup: bool = False
    warmup_lr: float = 0.01
    warmup_until_error: float = 0.8
    warmup_ema: float = 0.95


# ---- data --------------------------------------------------------------------------------------------------


def load_train(data_dir: str | None = None, num: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CIFAR-10 training images (uint8 NHWC), labels and per-pixel mean (HWC, [0, 1]); ``num``: only the first
    ``num`` training examples are decoded (the mean is then theirs), which keeps the tests short."""
    if num is None:
        data = cifar10.load(data_dir)
        return data.train.images, data.train.labels, data.mean
    import tensorflow_datasets as tfds  # noqa: PLC0415

    source = tfds.data_source("cifar10", split=f"train[:{num}]", data_dir=cifar10.find_data_dir(data_dir),
                              download=False)
    examples = source.__getitems__(list(range(num)))
    images = np.stack([ex["image"] for ex in examples]).astype(np.uint8)
    labels = np.asarray([ex["label"] for ex in examples], np.int32)
    mean = (images.astype(np.float64).mean(axis=0) / 255.0).astype(np.float32)
    return images, labels, mean


# ---- weights: resflax variables <-> the reference network's state dict -----------------------------------


def _torch_key(key: str, blocks_per_stage: int) -> str:
    """torchvision's ``layer{i}.{j}.`` (resflax.weights' layout) -> torch_reference's flat ``layers.{k}.``."""
    m = re.match(r"layer(\d+)\.(\d+)\.(.*)", key)
    if not m:
        return key
    return f"layers.{(int(m.group(1)) - 1) * blocks_per_stage + int(m.group(2))}.{m.group(3)}"


def to_reference(variables: dict, model) -> dict[str, np.ndarray]:
    """resflax ``{"params", "batch_stats"}`` as a state dict of ``torch_reference``'s CIFAR network."""
    n = model.stage_sizes[0]
    return {_torch_key(k, n): v for k, v in weights.to_torch(variables, model, "torchvision").items()}


def _split(state: dict[str, np.ndarray]) -> tuple[dict, dict, dict]:
    params = {k: v for k, v in state.items() if not re.search(r"running_|num_batches", k)}
    means = {k: v for k, v in state.items() if k.endswith("running_mean")}
    variances = {k: v for k, v in state.items() if k.endswith("running_var")}
    return params, means, variances


def _rel(ref: dict, other: dict) -> float:
    """Worst tensor's ``max|a - b| / max|a|`` (0 where both are exactly zero)."""
    worst = 0.0
    for k, a in ref.items():
        b = other[k]
        scale = float(np.max(np.abs(a)))
        diff = float(np.max(np.abs(a.astype(np.float64) - b)))
        if diff:
            worst = max(worst, diff / max(scale, 1e-30))
    return worst


def compare(ref: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, float]:
    """Relative differences of parameters, running means and running variances (worst tensor, see ``_rel``),
    and of all parameters together (``params_l2``: ``|a - b| / |a|``, L2)."""
    (p, m, v), (p2, m2, v2) = _split(ref), _split(other)
    a, b = _flat(p, list(p)), _flat(p2, list(p))
    return {"params": _rel(p, p2), "params_l2": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
            "bn_mean": _rel(m, m2), "bn_var": _rel(v, v2)}


# ---- the two trainers --------------------------------------------------------------------------------------


def _trace(opt_state):
    """The momentum buffers in resflax's optimizer state (``optax.trace``'s ``TraceState``)."""
    found = [s for s in opt_state if hasattr(s, "trace")]
    if len(found) != 1:
        raise ValueError("expected one optax.trace state in the optimizer state")
    return found[0].trace


class Resflax:
    """resflax's own jitted train step on a 1-device mesh, and the batch it is about to draw."""

    def __init__(self, model_name: str, recipe: Recipe, batch: int, images, labels, mean, seed: int = 0,
                 unbiased: bool = True):
        self.model = get_model(model_name, bn_unbiased_var=unbiased, bn_momentum=1.0 - recipe.bn_momentum)
        tx_fn = lambda p: state_lib.make_optimizer(p, recipe.momentum, recipe.weight_decay, "all")
        init = state_lib.init_state(self.model, tx_fn, seed, (32, 32, 3), recipe.warmup)
        cfg = step_lib.step_config(recipe.boundaries, batch_size=batch, base_lr=recipe.base_lr,
                                   factor=recipe.factor, warmup_lr=recipe.warmup_lr,
                                   warmup_until_error=recipe.warmup_until_error, warmup_ema=recipe.warmup_ema)
        mesh = step_lib.make_mesh(1)
        self.step_fn = step_lib.make_train_step(self.model, tx_fn(init.params), cfg, mesh)
        self.state = step_lib.replicate(init, mesh)
        self.data = step_lib.replicate((jnp.asarray(images), jnp.asarray(labels), jnp.asarray(mean)), mesh)

        def draw(state, images, labels, mean):  # what the step does before the model (1 device: d = 0)
            rng_data, rng_aug = step_lib._keys(state)
            gidx = step_lib.batch_indices(rng_data, state.step, labels.shape[0], batch)
            positions = state.step * batch + jnp.arange(batch)
            keys = jax.vmap(jax.random.fold_in, (None, 0))(rng_aug, positions)
            return augment.train_augment(images[gidx], mean, keys), labels[gidx]

        self._draw = jax.jit(draw)

    def batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The batch the next ``step`` trains on (NHWC float32, labels)."""
        x, y = self._draw(self.state, *self.data)
        return np.asarray(x), np.asarray(y)

    def step(self) -> dict[str, float]:
        self.state, metrics = self.step_fn(self.state, *self.data)
        out = {k: float(v) for k, v in jax.device_get(metrics).items()}
        out["warmup_active"] = bool(self.state.warmup_active)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters and BN statistics as the reference network's state dict (host copies)."""
        host = jax.device_get({"params": self.state.params, "batch_stats": self.state.batch_stats})
        return to_reference(host, self.model)

    def buffers(self) -> dict[str, np.ndarray]:
        """The momentum buffers, keyed like the reference network's parameters."""
        return to_reference({"params": jax.device_get(_trace(self.state.opt_state))}, self.model)


class Torch:
    """``torch_reference``'s network trained with torch.optim.SGD and the paper's schedule and warm-up rule."""

    def __init__(self, model_name: str, recipe: Recipe, state_dict: dict[str, np.ndarray], threads: int | None = None,
                 channels_last: bool = False, dtype: torch.dtype = torch.float32):
        if threads:
            torch.set_num_threads(threads)
        self.recipe = recipe
        self.channels_last = channels_last
        self.dtype = dtype
        self.net = build_model(model_name)[0].to(dtype)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.load(state_dict)
        for m in self.net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = recipe.bn_momentum
        self.net.train()
        self.opt = torch.optim.SGD(self.net.parameters(), lr=recipe.base_lr, momentum=recipe.momentum,
                                   weight_decay=recipe.weight_decay, dampening=0.0, nesterov=False)
        self.t = 0
        self.warmup_active = recipe.warmup
        self.ema = np.float32(0.9)  # the smoothed training error the warm-up watches (float32, as resflax's)
        self.switch_step = -1

    def load(self, state_dict: dict[str, np.ndarray], buffers: dict[str, np.ndarray] | None = None) -> None:
        """Sets parameters and BN statistics (and the momentum buffers): used to start, and to re-synchronise
        with resflax before a single-step comparison; the schedule's bookkeeping is kept."""
        with torch.no_grad():
            own = self.net.state_dict()
            missing = set(own) - set(state_dict)
            if missing or set(state_dict) - set(own):
                raise KeyError(f"state dict keys differ: {sorted(missing ^ (set(state_dict) - set(own)))[:3]}")
            for k, v in own.items():
                v.copy_(torch.from_numpy(np.array(state_dict[k])))
        if buffers is not None:
            for name, p in self.net.named_parameters():
                fmt = torch.channels_last if self.channels_last and p.ndim == 4 else torch.contiguous_format
                buf = torch.from_numpy(np.array(buffers[name])).to(self.dtype)
                self.opt.state[p]["momentum_buffer"] = buf.to(memory_format=fmt)

    def lr(self) -> float:
        r = self.recipe
        if self.warmup_active:
            return r.warmup_lr
        return r.base_lr * r.factor ** sum(self.t >= b for b in r.boundaries)

    def step(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        lr = self.lr()
        for g in self.opt.param_groups:
            g["lr"] = lr
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(self.dtype)
        if self.channels_last:
            xt = xt.contiguous(memory_format=torch.channels_last)
        yt = torch.from_numpy(y.astype(np.int64))
        logits = self.net(xt)
        loss = F.cross_entropy(logits, yt)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        error = float((logits.detach().argmax(1) != yt).float().mean())
        r = self.recipe
        self.ema = np.float32(r.warmup_ema) * self.ema + np.float32(1 - r.warmup_ema) * np.float32(error)
        self.t += 1
        if self.warmup_active and self.ema < r.warmup_until_error:
            self.warmup_active, self.switch_step = False, self.t
        return {"lr": lr, "loss": float(loss.detach()), "error": error, "warmup_active": self.warmup_active}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy().copy() for k, v in self.net.state_dict().items()}

    def buffers(self) -> dict[str, np.ndarray]:
        return {name: self.opt.state[p]["momentum_buffer"].numpy().copy() for name, p in self.net.named_parameters()}


# ---- the comparison ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    records: list[dict]  # one per step
    switch_step: dict[str, int]  # warm-up end per trainer; -1: not (yet)
    kept: list[dict] = dataclasses.field(default_factory=list)  # the first ``keep`` steps, for replays


def _flat(d: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(d[k], np.float64).ravel() for k in keys])


def _forced(pt: Torch, before: tuple[dict, dict], after: tuple[dict, dict], x, y) -> dict:
    """One PyTorch step from resflax's state ``before`` (parameters and BN statistics, momentum buffers) on the
    batch ``(x, y)``, compared with resflax's state ``after`` that step:

    * ``bn_mean``, ``bn_var``: worst tensor's relative difference of the new running statistics;
    * ``update``, ``buffers``: ``|a - b| / |a|`` (L2 over all parameters) of the step's parameter change
      ``w_{t+1} - w_t`` and of the new momentum buffers;
    * ``decay``, ``momentum``: the buffers' difference projected on ``w_t`` and on the previous buffer,
      ``<buf_rx - buf_pt, w_t> / <w_t, w_t>`` and ``<buf_rx - buf_pt, buf_t> / <buf_t, buf_t>``: resflax's
      weight decay and momentum coefficients minus PyTorch's, as this step applied them (the gradients'
      float32 differences average out in the projection; 0 at step 0 for the momentum, whose buffer is 0).
    """
    pt.load(*before)
    out = pt.step(x, y)
    rec = {f"forced_{k}": v for k, v in out.items()}
    theirs, their_buf = pt.state_dict(), pt.buffers()
    cmp = compare(after[0], theirs)
    rec["forced_bn_mean"], rec["forced_bn_var"] = cmp["bn_mean"], cmp["bn_var"]
    keys = list(after[1])
    w0, w1, w1t = _flat(before[0], keys), _flat(after[0], keys), _flat(theirs, keys)
    b0, b1, b1t = _flat(before[1], keys), _flat(after[1], keys), _flat(their_buf, keys)
    rec["forced_update"] = float(np.linalg.norm(w1 - w1t) / np.linalg.norm(w1 - w0))
    rec["forced_buffers"] = float(np.linalg.norm(b1 - b1t) / np.linalg.norm(b1))
    rec["forced_decay"] = float(np.dot(b1 - b1t, w0) / np.dot(w0, w0))
    rec["forced_momentum"] = float(np.dot(b1 - b1t, b0) / np.dot(b0, b0)) if np.any(b0) else 0.0
    return rec


def run(model_name: str, steps: int, batch: int, recipe: Recipe, images, labels, mean, seed: int = 0,
        free: bool = True, forced_every: int = 0, control_steps: int = 0, torch_recipe: Recipe | None = None,
        unbiased: bool = True, keep: int = 0, threads: int | None = None,
        progress: Callable[[dict], None] | None = None) -> Result:
    """Trains resflax for ``steps`` steps and compares PyTorch with it, in lock step, in up to three ways:

    * ``free``: a PyTorch network trained on its own from the same initial weights on the same batches
      (record keys ``*_torch`` and ``params``/``bn_mean``/``bn_var``, its differences from resflax);
    * ``forced_every=k``: every k-th step, a second PyTorch network is re-synchronised to resflax's state
      (parameters, BN statistics, momentum buffers) and takes that one step (keys ``forced_*``): what one step
      does, without the drift that two float32 trainings accumulate. The warm-up rule needs ``k = 1``;
    * ``control_steps=n``: for the first n steps a third network, PyTorch in channels-last memory format (the
      same arithmetic, other kernels), trained on its own (keys ``control_*``: its differences from the free
      PyTorch run), to show how fast two float32 PyTorch trainings drift apart.

    ``torch_recipe`` (default ``recipe``) lets PyTorch follow another recipe (a negative control);
    ``unbiased=False`` builds resflax's default BN (biased running variance). ``keep``: the batches and resflax's
    states of the first ``keep`` steps are returned (``replay_forced``).
    """
    if forced_every > 1 and recipe.warmup:
        raise ValueError("the warm-up rule needs forced_every=1 (its bookkeeping reads every step's error)")
    jx = Resflax(model_name, recipe, batch, images, labels, mean, seed, unbiased)
    before = (jx.state_dict(), jx.buffers())
    trecipe = torch_recipe or recipe
    pt = Torch(model_name, trecipe, before[0], threads) if free else None
    pf = Torch(model_name, trecipe, before[0], threads) if forced_every else None
    pc = Torch(model_name, trecipe, before[0], threads, channels_last=True) if control_steps else None
    records, kept = [], []
    for t in range(steps):
        x, y = jx.batch()
        rec = {"step": t, **{f"{k}_resflax": v for k, v in jx.step().items()}}
        after = (jx.state_dict(), jx.buffers())
        if pt is not None:
            rec.update({f"{k}_torch": v for k, v in pt.step(x, y).items()})
            rec.update(compare(after[0], pt.state_dict()))
        if pf is not None:
            if t % forced_every == 0:
                rec.update(_forced(pf, before, after, x, y))
            else:
                pf.t += 1  # the schedule's clock (without the warm-up, which forced_every=1 needs)
        if pc is not None and t < control_steps:
            c = pc.step(x, y)
            rec.update({f"control_{k}": v for k, v in c.items()})
            if pt is not None:
                rec.update({f"control_{k}": v for k, v in compare(pt.state_dict(), pc.state_dict()).items()})
        if t < keep:
            kept.append({"x": x, "y": y, "before": before, "after": after, "record": rec})
        before = after
        records.append(rec)
        if progress:
            progress(rec)
    switch = {"resflax": int(jx.state.warmup_switch_step)}
    for name, trainer in (("torch", pt), ("forced", pf)):
        if trainer is not None:
            switch[name] = trainer.switch_step
    return Result(records, switch, kept)


def replay_forced(model_name: str, result: Result, torch_recipe: Recipe, threads: int | None = None) -> list[dict]:
    """The single-step comparison (``forced``) of ``result``'s kept steps, with PyTorch following
    ``torch_recipe``: what a recipe that differs from resflax's would give, without rerunning resflax."""
    pf = Torch(model_name, torch_recipe, result.kept[0]["before"][0], threads)
    out = []
    for t, k in enumerate(result.kept):
        names = ("lr_resflax", "loss_resflax", "error_resflax", "warmup_active_resflax")
        rec = {"step": t, **{n: k["record"][n] for n in names}}
        rec.update(_forced(pf, k["before"], k["after"], k["x"], k["y"]))
        out.append(rec)
    return out


def float64_step(model_name: str, recipe: Recipe, batch: int, images, labels, mean, seed: int = 0,
                 threads: int | None = None) -> dict[str, dict[str, float]]:
    """How far one float32 step is from exact: the first step (same init, same batch) of resflax, PyTorch
    (NCHW) and PyTorch channels-last, each against PyTorch in float64. Per implementation: the parameter change's
    error ``|d - d64| / |d64|`` (L2 over all parameters; ``worst``: worst tensor's max-abs), and the loss's."""
    jx = Resflax(model_name, recipe, batch, images, labels, mean, seed)
    before = jx.state_dict()
    x, y = jx.batch()
    loss = {"resflax": jx.step()["loss"]}
    after = {"resflax": jx.state_dict()}
    for name, kw in (("torch", {}), ("torch_channels_last", {"channels_last": True}),
                     ("torch_float64", {"dtype": torch.float64})):
        pt = Torch(model_name, recipe, before, threads, **kw)
        loss[name] = pt.step(x, y)["loss"]
        after[name] = pt.state_dict()
    keys = list(_split(before)[0])
    ref = _flat(after["torch_float64"], keys) - _flat(before, keys)
    out = {}
    for name in ("resflax", "torch", "torch_channels_last"):
        d = _flat(after[name], keys) - _flat(before, keys)
        worst = 0.0
        for k in keys:
            dk = np.asarray(after[name][k], np.float64) - before[k]
            rk = np.asarray(after["torch_float64"][k], np.float64) - before[k]
            worst = max(worst, float(np.max(np.abs(dk - rk)) / max(np.max(np.abs(rk)), 1e-30)))
        out[name] = {"update_l2": float(np.linalg.norm(d - ref) / np.linalg.norm(ref)), "update_worst": worst,
                     "loss": abs(loss[name] - loss["torch_float64"]) / loss["torch_float64"]}
    return out


def summary(records: list[dict]) -> dict[str, float]:
    """Largest differences over the records, per kind of comparison present in them."""
    out: dict[str, float] = {"steps": len(records)}
    for kind, pre, suf in (("free", "", "_torch"), ("forced", "forced_", "")):
        rs = [r for r in records if f"{pre}loss{suf}" in r]
        if not rs:
            continue
        loss = lambda r: r[f"{pre}loss{suf}"]  # noqa: B023
        lr = lambda r: r[f"{pre}lr{suf}"]  # noqa: B023
        dl = [abs(r["loss_resflax"] - loss(r)) for r in rs]
        de = [abs(r["error_resflax"] - r[f"{pre}error{suf}"]) for r in rs]
        out[kind] = {
            "steps_compared": len(rs),
            # resflax computes the lr in float32 (0.1 * 0.1**k: 0.0100000007 vs 0.01): compare to 1e-6
            "lr_mismatches": int(sum(abs(r["lr_resflax"] - lr(r)) > 1e-6 * lr(r) for r in rs)),
            "max_abs_dloss": max(dl),
            "mean_abs_dloss": float(np.mean(dl)),
            "max_rel_dloss": max(d / loss(r) for d, r in zip(dl, rs)),
            "max_abs_derror": max(de),
            "steps_with_derror": int(sum(d > 0 for d in de)),
            "max_rel_dbn_mean": max(r[f"{pre}bn_mean"] for r in rs),
            "max_rel_dbn_var": max(r[f"{pre}bn_var"] for r in rs),
        }
        if kind == "free":
            out[kind]["max_rel_dparams"] = max(r["params"] for r in rs)
            out[kind]["max_rel_dparams_l2"] = max(r["params_l2"] for r in rs)
        else:
            for k in ("update", "buffers", "decay", "momentum"):
                out[kind][f"max_abs_{k}"] = max(abs(r[f"forced_{k}"]) for r in rs)
    return out


# ---- the script --------------------------------------------------------------------------------------------


def _smooth(v: np.ndarray, k: int) -> np.ndarray:
    return np.convolve(v, np.ones(k) / k, "valid") if len(v) >= k else v[:0]


def plot(records: list[dict], title: str, path: Path, smooth: int = 50) -> None:
    """Training loss and error of both frameworks, the free runs' differences (and PyTorch-vs-PyTorch's), and
    the single-step differences."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    def series(key):
        rs = [r for r in records if key in r]
        return np.asarray([r["step"] for r in rs]), np.asarray([float(r[key]) for r in rs])

    fig, ax = plt.subplots(2, 2, figsize=(14, 9))
    k = min(smooth, max(1, len(records) // 10))
    names = {"resflax": "resflax (JAX/Flax)", "torch": "PyTorch"}
    for key, a in (("loss", ax[0, 0]), ("error", ax[0, 1])):
        for fw, c, ls in (("resflax", "C0", "-"), ("torch", "C3", "--")):
            t, v = series(f"{key}_{fw}")
            a.plot(t, v, color=c, lw=0.3, alpha=0.35)
            a.plot(t[k - 1:], _smooth(v, k), color=c, ls=ls, lw=1.2, label=f"{names[fw]}, mean of {k} steps")
        a.set_title(f"training {key} per step (thin: each step's batch)")
        a.set_xlabel("step")
        a.legend()
    ax[0, 0].set_yscale("log")
    a = ax[1, 0]
    t, lr = series("lr_resflax")
    dl = np.abs(series("loss_resflax")[1] - series("loss_torch")[1])
    a.semilogy(t, np.maximum(dl, 1e-9), lw=0.4, color="C2", label="|loss difference|")
    a.semilogy(*series("params_l2"), lw=1.2, color="C4", label="parameters, |a - b| / |a|")
    a.semilogy(*series("bn_var"), lw=0.8, color="C5", label="BN running var (worst tensor)")
    tc, lc = series("control_loss")
    if len(tc):
        base = np.asarray([r["loss_torch"] for r in records[: len(tc)]])
        a.semilogy(tc, np.maximum(np.abs(lc - base), 1e-9), lw=0.6, color="0.4", ls=":",
                   label="control: |loss difference|, PyTorch vs PyTorch channels-last")
        a.semilogy(*series("control_params_l2"), lw=1.2, color="k", ls=":", label="control: parameters")
    a.set_title("free runs: resflax vs PyTorch (same init, same batches)")
    a.set_xlabel("step")
    a.set_ylim(3e-10, 1e2)
    a.legend(fontsize=8, loc="lower right")
    a = ax[1, 1]
    tf, fl = series("forced_loss")
    if len(tf):
        lf = np.asarray([r["loss_resflax"] for r in records if "forced_loss" in r])
        a.semilogy(tf, np.maximum(np.abs(fl - lf) / lf, 1e-9), ".", ms=3, color="C2",
                   label="loss (relative; 1e-9: equal)")
        for key, c, lab in (("forced_update", "C4", "parameter change, L2"),
                            ("forced_buffers", "C1", "momentum buffers, L2"),
                            ("forced_bn_var", "C5", "BN running var (worst tensor)"),
                            ("forced_bn_mean", "C6", "BN running mean (worst tensor)")):
            a.semilogy(*series(key), ".", ms=3, color=c, label=lab)
        td, dd = series("forced_decay")
        a.semilogy(td, np.maximum(np.abs(dd) / 1e-4, 1e-12), "x", ms=3, color="C8",
                   label="weight decay as applied: |difference| / 1e-4")
    a.set_title("single steps from resflax's state (PyTorch re-synchronised)")
    a.set_xlabel("step")
    a.set_ylim(3e-10, 1e0)
    a.legend(fontsize=8, loc="upper center", ncol=2)
    drops = [int(t[i]) for i in range(1, len(lr)) if lr[i] != lr[i - 1]]
    for a in ax.flat:
        for d in drops:
            a.axvline(d, color="0.75", lw=0.8, zorder=0)
    fig.suptitle(f"resflax vs PyTorch: {title} (step t: the (t+1)-th SGD step)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet20", help="resnet20, plain20, resnet110, ... (CIFAR, option A)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--boundaries", default="1000,1500", help="lr drops (steps), comma-separated")
    ap.add_argument("--warmup", action="store_true", help="the ResNet-110 warm-up rule (lr 0.01 first)")
    ap.add_argument("--warmup_until_error", type=float, default=0.8)
    ap.add_argument("--forced_every", type=int, default=10,
                    help="single-step comparison every N steps (0: none; the warm-up needs 1)")
    ap.add_argument("--control_steps", type=int, default=200,
                    help="steps of the PyTorch-vs-PyTorch (channels-last) control run (0: none)")
    ap.add_argument("--num_train", type=int, default=None, help="only the first N training images (default all)")
    ap.add_argument("--biased", action="store_true", help="resflax's default BN (biased running variance)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--data_dir", default=None)
    ap.add_argument("--out", default="docs/parity", help="folder for NAME.json and NAME.png")
    ap.add_argument("--name", default=None, help="file stem (default MODEL_STEPS)")
    ap.add_argument("--plot_only", default=None, metavar="JSON", help="only: redraw the plot of a records file")
    ap.add_argument("--float64_step", action="store_true",
                    help="only: one step of resflax, PyTorch and PyTorch channels-last against PyTorch float64")
    args = ap.parse_args(argv)

    if args.plot_only:
        saved = json.loads(Path(args.plot_only).read_text())
        m = saved["meta"]
        png = Path(args.plot_only).with_suffix(".png")
        plot(saved["records"], f"{m['model']}, batch {m['batch']}, {m['steps']} steps, lr drops at "
             f"{list(m['recipe']['boundaries'])}", png)
        print(f"wrote {png}")
        return 0
    bounds = tuple(int(b) for b in args.boundaries.split(",") if b.strip())
    recipe = Recipe(boundaries=bounds, warmup=args.warmup, warmup_until_error=args.warmup_until_error)
    t0 = time.time()
    images, labels, mean = load_train(args.data_dir, args.num_train)
    print(f"CIFAR-10: {len(labels)} training images in {time.time() - t0:.1f} s", flush=True)
    if args.float64_step:
        f64 = float64_step(args.model, recipe, args.batch, images, labels, mean, args.seed, args.threads)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{args.name or args.model}_float64_step.json"
        cli = sys.argv[1:] if argv is None else argv
        path.write_text(json.dumps({"command": " ".join(["python benchmarks/train_parity.py", *cli]),
                                    "batch": args.batch, "seed": args.seed, "errors_vs_float64": f64}, indent=1)
                        + "\n")
        print(json.dumps(f64, indent=1))
        print(f"wrote {path}")
        return 0
    t0 = time.time()

    def progress(r):
        s = r["step"] + 1
        if s % 50 == 0 or s == args.steps:
            print(f"step {s}: lr {r['lr_resflax']:g}/{r['lr_torch']:g} loss {r['loss_resflax']:.5f}/"
                  f"{r['loss_torch']:.5f} error {r['error_resflax']:.4f}/{r['error_torch']:.4f} params "
                  f"{r['params_l2']:.1e} ({time.time() - t0:.0f} s)", flush=True)

    res = run(args.model, args.steps, args.batch, recipe, images, labels, mean, args.seed,
              forced_every=args.forced_every, control_steps=args.control_steps, unbiased=not args.biased,
              threads=args.threads, progress=progress)
    elapsed = time.time() - t0
    summ = summary(res.records)
    summ["warmup_switch_step"] = res.switch_step
    summ["seconds"] = round(elapsed, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{args.model}_{args.steps}"
    cli = sys.argv[1:] if argv is None else argv
    meta = {"command": " ".join(["python benchmarks/train_parity.py", *cli]),
            "model": args.model, "steps": args.steps, "batch": args.batch, "recipe": dataclasses.asdict(recipe),
            "num_train": len(labels), "seed": args.seed, "bn_unbiased_var": not args.biased,
            "forced_every": args.forced_every, "control_steps": args.control_steps,
            "jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    records = [{k: float(f"{v:.9g}") if isinstance(v, float) else v for k, v in r.items()} for r in res.records]
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "summary": summ, "records": records}) + "\n")
    plot(res.records, f"{args.model}, batch {args.batch}, {args.steps} steps, lr drops at {list(bounds)}",
         out / f"{stem}.png")
    print(json.dumps(summ, indent=1))
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
