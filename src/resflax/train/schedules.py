"""Learning-rate schedules as pure functions of the step (and of the warm-up flag).

The paper (Sec. 4.2): lr 0.1, divided by 10 at 32k and 48k iterations, stop at 64k. For ResNet-110 (and
1202) training starts at lr 0.01 until the training error is below 80%, then goes *back* to 0.1 and follows
the schedule above. The warm-up is a flag in the train state, so the schedule itself stays a pure function.
"""

from __future__ import annotations

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


def learning_rate(step, warmup_active, base_lr: float, boundaries: Sequence[int], factor: float, warmup_lr: float):
    """The lr used at ``step``: ``warmup_lr`` while the warm-up is active, else the piecewise schedule."""
    return jnp.where(warmup_active, jnp.float32(warmup_lr), piecewise_lr(step, base_lr, boundaries, factor))


def linear_warmup_lr(step, base_lr: float, boundaries: Sequence[int], factor: float, warmup_steps: int):
    """The piecewise schedule with a gradual linear warm-up (Goyal et al. 2017) over its first
    ``warmup_steps`` steps: ``lr * (step + 1) / warmup_steps`` until then (0: no warm-up)."""
    lr = piecewise_lr(step, base_lr, boundaries, factor)
    if warmup_steps > 0:
        ramp = jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / float(warmup_steps))
        lr = lr * ramp
    return lr


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

    def state(self) -> dict:
        return {"best": self.best, "bad": self.bad, "drops": list(self.drops)}

    def load(self, state: dict) -> None:
        self.best, self.bad, self.drops = state["best"], int(state["bad"]), [int(s) for s in state["drops"]]
