"""The learning rate, decided here and nowhere else: every rule a run's lr follows, built from its config.

- CIFAR-10 (the paper, Sec. 4.2): lr 0.1, divided by 10 at 32k and 48k iterations, stop at 64k. For ResNet-110
  (and 1202) training starts at lr 0.01 until the training error is below 80%, then goes *back* to 0.1 and
  follows the schedule above. The warm-up is a flag in the train state (``warmup_update`` keeps it), so the
  schedule itself stays a pure function of the step and the flag.
- ImageNet (Sec. 3.4): lr 0.1 divided by 10 at fixed boundaries, or "when the error plateaus" (``Plateau``:
  a host-side rule whose few numbers the loop carries and saves with every checkpoint); optionally scaled
  linearly with the batch (``peak_lr``) and ramped up over the first steps (Goyal et al. 2017).

``Schedule`` is what the jitted train step evaluates (``lr(step, warmup_active)``, times the plateau's factor
where there is one); ``from_config`` derives it, the run's length and the plateau rule from a config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp


def scaled_steps(steps: int, scale: float) -> int:
    """A paper step count scaled for short studies (at least 1)."""
    return max(1, int(round(steps * scale)))


def piecewise_lr(step, base_lr: float, boundaries: Sequence[int], factor: float):
    """``base_lr * factor**k`` where ``k`` is the number of boundaries ``<= step``."""
    step = jnp.asarray(step)
    k = sum((step >= b).astype(jnp.int32) for b in boundaries) if boundaries else jnp.zeros((), jnp.int32)
    return base_lr * jnp.asarray(factor, jnp.float32) ** k


def linear_warmup_lr(step, base_lr: float, boundaries: Sequence[int], factor: float, warmup_steps: int):
    """The piecewise schedule with a gradual linear warm-up (Goyal et al. 2017) over its first
    ``warmup_steps`` steps: ``lr * (step + 1) / warmup_steps`` until then (0: no warm-up)."""
    lr = piecewise_lr(step, base_lr, boundaries, factor)
    if warmup_steps > 0:
        ramp = jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / float(warmup_steps))
        lr = lr * ramp
    return lr


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The lr as a function of the step and the warm-up flag (evaluated inside the train step)."""

    base_lr: float  # the peak lr (after ``peak_lr``'s scaling)
    boundaries: tuple[int, ...]  # steps at which the lr is multiplied by ``factor`` (none under the plateau rule)
    factor: float
    warmup_lr: float = 0.01  # the CIFAR ResNet-110 rule: the lr while the warm-up flag is on
    warmup_until_error: float = 0.8  # ... until the smoothed training error is below this
    warmup_ema: float = 0.95  # smoothing of that training error
    ramp_steps: int = 0  # gradual linear warm-up over the first steps (0: none)

    def lr(self, step, warmup_active):
        """The lr used at ``step``: ``warmup_lr`` while the warm-up is active, else the (ramped) piecewise
        schedule."""
        base = linear_warmup_lr(step, self.base_lr, self.boundaries, self.factor, self.ramp_steps)
        return jnp.where(warmup_active, jnp.float32(self.warmup_lr), base)

    def warmup_update(self, step, active, ema, switch_step, error):
        """The warm-up flag's bookkeeping after a step with training error ``error`` (a fraction): the new
        ``(ema, active, switch_step)``; the flag goes off (for good) once the smoothed error is below
        ``warmup_until_error``, and ``switch_step`` records the step after which it did."""
        ema = self.warmup_ema * ema + (1 - self.warmup_ema) * error
        switch = active & (ema < self.warmup_until_error)
        return ema.astype(jnp.float32), active & ~switch, jnp.where(switch, step + 1, switch_step)


def peak_lr(config) -> float:
    """The base lr, scaled linearly with the global batch (``lr_scaling='linear'``: lr * batch / reference)."""
    if config.get("lr_scaling", "none") == "linear":
        return config.base_lr * config.batch_size / config.lr_reference_batch
    return config.base_lr


def from_config(config) -> tuple[int, tuple[int, ...], Schedule]:
    """The run's last step, its scheduled lr drops and its ``Schedule``, every step count times
    ``schedule_scale`` (the boundaries stay the config's under the plateau rule, which decides drops itself)."""
    scale = config.schedule_scale
    num_steps = scaled_steps(config.num_steps, scale)
    boundaries = tuple(scaled_steps(b, scale) for b in config.lr_boundaries)
    ramp = config.get("lr_warmup_steps") or 0
    schedule = Schedule(
        base_lr=peak_lr(config), boundaries=() if config.get("lr_schedule") == "plateau" else boundaries,
        factor=config.lr_factor, warmup_lr=config.warmup_lr, warmup_until_error=config.warmup_until_error,
        ramp_steps=scaled_steps(ramp, scale) if ramp else 0)
    return num_steps, boundaries, schedule


def plateau(config) -> Plateau | None:
    """The plateau rule of a config with ``lr_schedule='plateau'``, else None."""
    if config.get("lr_schedule") != "plateau":
        return None
    return Plateau(config.plateau_patience, config.plateau_min_delta, config.lr_factor, config.plateau_max_drops)


class Plateau:
    """The paper's "divide the lr by 10 when the error plateaus" as a rule: after each evaluation of the
    held-out split, if its error has not improved on the best so far by at least ``min_delta`` points for
    ``patience`` evaluations in a row, the lr is multiplied by ``factor`` (at most ``max_drops`` times) and the
    count starts again. Its state is a few numbers, saved with every checkpoint, so a resumed run decides the
    same drops at the same steps."""

    def __init__(self, patience: int, min_delta: float, factor: float, max_drops: int):
        self.patience, self.min_delta, self.factor, self.max_drops = patience, min_delta, factor, max_drops
        self.best: float | None = None
        self.bad = 0
        self.drops: list[int] = []  # steps at which the lr was divided

    def scale(self) -> float:
        return float(self.factor) ** len(self.drops)

    def update(self, error: float, step: int) -> bool:
        """Takes the held-out error (%) measured at ``step``; True if the lr drops from this step on."""
        if self.best is None or error < self.best - self.min_delta:
            self.best, self.bad = error, 0
            return False
        self.bad += 1
        if self.bad >= self.patience and len(self.drops) < self.max_drops:
            self.drops.append(int(step))
            self.bad = 0
            self.best = error
            return True
        return False

    def observe(self, results: dict, step: int) -> str | None:
        """Takes an evaluation's results (``{"val": {"error": ...}, ...}``) at ``step``; returns the message
        when the lr drops from this step on."""
        if "val" not in results or not self.update(results["val"]["error"], step):
            return None
        return (f"held-out error {results['val']['error']:.2f}% has not improved by {self.min_delta} for "
                f"{self.patience} evaluations: lr divided by {1 / self.factor:g} from step {step} "
                f"(drop {len(self.drops)})")

    def state(self) -> dict:
        return {"best": self.best, "bad": self.bad, "drops": list(self.drops)}

    def load(self, state: dict) -> None:
        self.best, self.bad, self.drops = state["best"], int(state["bad"]), [int(s) for s in state["drops"]]
