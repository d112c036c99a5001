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
