"""Weight initialisers: the same numbers as JAX's, compiled faster on the CPU.

Initialising a network eagerly (``model.init`` outside ``jit``, as ``init_state`` does) compiles one small
XLA program per distinct weight shape for the random draw (threefry, then the inverse error function). On
XLA:CPU that compilation dominates start-up: ~0.5-2.5 s per shape at LLVM's default -O2, ~0.2-0.4 s at -O1
(a cold ``init`` of ResNet-20: 10.4 s before, 4.9 s with these). At -O1 the draws are the same bits (-O0
is not: it changes them): ``tests/test_models.py::test_initializers_give_jaxs_values`` compares them with
JAX's own initialisers bit for bit, and every state digest in docs/ is unchanged. So on the CPU, outside any
transformation and with a jaxlib this was checked with (``resflax.xla.TESTED_JAXLIB``), the draw is compiled
at -O1; everywhere else (GPU/TPU, traced inside ``jit``/``eval_shape``/``vmap``, other jaxlib versions)
these call JAX's initialisers' own code.

JAX 0.12 changed how its initialisers scale a normal draw: ``(sqrt(2) * stddev) * erf_inv(u)`` (its
``_scaled_normal``, which gives the same bits eagerly and under ``jit``, where XLA now reassociates constant
factors) instead of ``normal(key) * stddev``, i.e. ``(sqrt(2) * erf_inv(u)) * stddev``. Float multiplication is
not associative, so the two orders differ in the last bit for about half the values; these initialisers use
the order of the installed JAX (``JAX_SCALES_INSIDE``), so the claim above holds on every JAX in resflax's range.
Consequence: a model initialised from the same seed on JAX 0.10/0.11 and on 0.12 has normal-initialised
weights up to 1 ulp apart (truncated normals, ``lecun_normal``, are unchanged).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import lax, random

from resflax import xla as _xla

# LLVM's optimisation level for the eager draws on the CPU (XLA's default is 2; 0 changes the numbers)
CPU_OPT_LEVEL = 1
# JAX >= 0.12 multiplies sqrt(2) into the standard deviation before it meets erf_inv(u) (see the docstring)
JAX_SCALES_INSIDE = jax.__version_info__[:2] >= (0, 12)


def _draw(key, shape, dtype, truncated: bool):
    """The random part of JAX's initialisers' draw of ``shape``, before the factor :func:`_factor` gives:
    ``random.truncated_normal(-2, 2)``; for a normal, ``erf_inv(u)`` with ``u`` uniform in (-1, 1) where JAX
    scales inside (as ``jax._src.nn.initializers._scaled_normal``), else ``random.normal``."""
    if truncated:
        return random.truncated_normal(key, -2, 2, shape, dtype)
    if JAX_SCALES_INSIDE:
        lo = np.nextafter(np.array(-1.0, dtype), np.array(0.0, dtype), dtype=dtype)
        return lax.erf_inv(random.uniform(key, shape, dtype, lo, np.array(1.0, dtype)))
    return random.normal(key, shape, dtype)


def _factor(stddev, dtype, truncated: bool):
    """What :func:`_draw`'s values are multiplied by to give JAX's: ``stddev``, or ``sqrt(2) * stddev`` for a
    normal where JAX scales inside (the same float32 product JAX forms)."""
    if truncated or not JAX_SCALES_INSIDE:
        return stddev
    return jnp.array(np.sqrt(2), dtype) * stddev


_draw_o1 = jax.jit(_draw, static_argnums=(1, 2, 3), compiler_options={"xla_backend_optimization_level": CPU_OPT_LEVEL})


@functools.cache
def _tested_jaxlib() -> bool:
    # the jaxlib version alone: xla.default_flags() (used here before) is also empty on CPUs where the YNN flag
    # is left out (AVX512-FP16), which turned these -O1 draws off there for no reason of their own
    return jaxlib.__version__ in _xla.TESTED_JAXLIB


def _standard(key, shape, dtype, truncated: bool):
    """``_draw``, compiled at -O1 when ``key`` is a concrete array (not traced) on CPU devices only and the
    jaxlib is a tested one: the same bits either way."""
    concrete = isinstance(key, jax.Array) and not isinstance(key, jax.core.Tracer)
    if concrete and _tested_jaxlib() and all(d.platform == "cpu" for d in key.devices()):
        return _draw_o1(key, shape, np.dtype(dtype), truncated)
    return _draw(key, shape, dtype, truncated)


def _fans(shape) -> tuple[float, float]:
    """JAX's fans for the default axes (inputs -2, outputs -1, the rest the receptive field)."""
    if len(shape) < 2:
        raise ValueError(f"a weight of rank {len(shape)} has no fan-in/fan-out (need >= 2 dimensions)")
    receptive_field_size = math.prod(shape) / shape[-2] / shape[-1]  # JAX's order of divisions
    return shape[-2] * receptive_field_size, shape[-1] * receptive_field_size


def variance_scaling(scale: float, mode: str, distribution: str):
    """``jax.nn.initializers.variance_scaling(scale, mode, distribution)`` for ``mode`` "fan_in"/"fan_out" and
    ``distribution`` "normal"/"truncated_normal" (default axes): the same values, see the module docstring."""
    if mode not in ("fan_in", "fan_out") or distribution not in ("normal", "truncated_normal"):
        raise ValueError(f"unsupported variance scaling: mode={mode!r}, distribution={distribution!r}")

    def init(key, shape, dtype=jnp.float32):
        shape = tuple(int(d) for d in shape)
        fan_in, fan_out = _fans(shape)
        variance = jnp.array(scale / (fan_in if mode == "fan_in" else fan_out), dtype=dtype)
        if distribution == "truncated_normal":
            stddev = jnp.sqrt(variance) / jnp.array(.87962566103423978, dtype)
            return _standard(key, shape, dtype, True) * stddev
        return _standard(key, shape, dtype, False) * _factor(jnp.sqrt(variance), dtype, False)

    return init


def normal(stddev: float = 1e-2):
    """``jax.nn.initializers.normal(stddev)``: the same values, see the module docstring."""

    def init(key, shape, dtype=jnp.float32):
        shape = tuple(int(d) for d in shape)
        return _standard(key, shape, dtype, False) * _factor(jnp.array(stddev, dtype), dtype, False)

    return init


# He et al. (2015) "Delving deep into rectifiers": N(0, 2 / fan_in), not truncated.
he_normal = variance_scaling(2.0, "fan_in", "normal")
# Flax's default for Dense and Conv kernels: truncated normal with variance 1 / fan_in.
lecun_normal = variance_scaling(1.0, "fan_in", "truncated_normal")
