"""Faster drop-in layers for the CPU (and any backend): BatchNorm and 3x3 convolution with hand-written VJPs.

Why (see docs/performance.md): XLA's automatic gradient of ``nn.BatchNorm`` makes several passes over each
activation and, in the weight gradients, fuses the whole BN + add + ReLU chain back into the transposes that
feed the weight-gradient convolutions, recomputing it many times. These layers keep Flax's parameter and
statistic names (``scale``, ``bias``; ``mean``, ``var``) and numerics (biased batch variance, Flax momentum
convention) and differ from ``nn.BatchNorm`` / ``nn.Conv`` only by float rounding:

* ``BatchNorm``: one fused pass for the batch moments (sum and sum of squares), one pass to normalise; the
  backward pass is one fused reduction (sum dy, sum dy*x) and one elementwise pass.
* ``Conv``: ``lax.conv_general_dilated`` whose VJP computes the input gradient as a plain forward convolution
  with the flipped, transposed kernel (faster on XLA:CPU than the transposed convolution autodiff emits).
* ``barrier``: an optimisation barrier used on block outputs so that the backward pass reads the stored
  activation instead of recomputing the chain that produced it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resflax.models import initializers

Array = Any


# --------------------------------------------------------------------------------------------------------------
# optimisation barrier (identity with an identity gradient that also cannot be fused through)
# --------------------------------------------------------------------------------------------------------------


@jax.custom_vjp
def barrier(x: Array) -> Array:
    return lax.optimization_barrier(x)


def _barrier_fwd(x):
    return lax.optimization_barrier(x), None


def _barrier_bwd(_, g):
    return (lax.optimization_barrier(g),)


barrier.defvjp(_barrier_fwd, _barrier_bwd)


# --------------------------------------------------------------------------------------------------------------
# ReLU whose gradient reads its output (so the pre-activation need not be kept: BN-apply + ReLU fuse into one pass)
# --------------------------------------------------------------------------------------------------------------


@jax.custom_vjp
def relu(x: Array) -> Array:
    return jnp.maximum(x, 0)


def _relu_fwd(x):
    y = jnp.maximum(x, 0)
    return y, y


def _relu_bwd(y, g):
    return (jnp.where(y > 0, g, jnp.zeros((), g.dtype)),)


relu.defvjp(_relu_fwd, _relu_bwd)


# --------------------------------------------------------------------------------------------------------------
# BatchNorm
# --------------------------------------------------------------------------------------------------------------


def bn_groups(local: int, group_size: int | None, axis_name: str | None) -> tuple[int, str | None, Any]:
    """How a BatchNorm over ``local`` images per device forms groups of ``group_size`` images (ghost batch).

    The groups are contiguous runs of ``group_size`` images of the global batch (device d holds images
    ``d*local .. (d+1)*local - 1``). Returns ``(groups, axis_name, index_groups)``: ``groups`` groups lie
    within each device's slice, each normalised alone; or one group spans several devices, whose statistics
    are averaged over ``axis_name`` within ``index_groups`` (None: over the whole axis). ``group_size`` None
    keeps the plain rule: the device's slice (``axis_name`` None) or the global batch (``axis_name`` set).
    ``ValueError`` (one line) when the geometry cannot be honoured."""
    if group_size is None or group_size == local:
        return 1, (axis_name if group_size is None else None), None
    if group_size < local:
        if local % group_size:
            raise ValueError(f"BatchNorm group size {group_size} does not divide the {local} images per device")
        return local // group_size, None, None
    if group_size % local:
        raise ValueError(f"BatchNorm group size {group_size} is not a whole number of devices' slices of "
                         f"{local} images (nor a divisor of one)")
    if axis_name is None:
        raise ValueError(f"BatchNorm group size {group_size} spans devices ({local} images each) but the "
                         "BatchNorm has no axis_name to combine them over")
    span, ndev = group_size // local, lax.axis_size(axis_name)
    if ndev % span:
        raise ValueError(f"BatchNorm group size {group_size} does not divide the global batch of "
                         f"{ndev * local} images")
    if span == ndev:
        return 1, axis_name, None
    return 1, axis_name, tuple(tuple(range(g * span, (g + 1) * span)) for g in range(ndev // span))


def _split(x: Array, groups: int) -> tuple[Array, tuple[int, ...]]:
    """``x`` as ``(groups, n / groups, ...)`` (unchanged for one group) and the axes reduced per group."""
    if groups == 1:
        return x, tuple(range(x.ndim - 1))
    xg = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
    return xg, tuple(range(1, xg.ndim - 1))


def _per_group(v: Array, groups: int, ndim: int) -> Array:
    """Per-channel values of each group (``(C,)`` or ``(groups, C)``) broadcastable against ``_split``'s input."""
    return v if groups == 1 else v.reshape(groups, *([1] * (ndim - 2)), v.shape[-1])


def _moments(x: Array, axis_name: str | None, groups: int = 1, index_groups: Any = None):
    xf, axes = _split(x.astype(jnp.float32), groups)
    mean = jnp.mean(xf, axes)
    mean_sq = jnp.mean(jnp.square(xf), axes)
    if axis_name is not None:
        mean, mean_sq = lax.pmean((mean, mean_sq), axis_name, axis_index_groups=index_groups)
    var = jnp.maximum(0.0, mean_sq - jnp.square(mean))
    return mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _bn_train(x, scale, bias, epsilon, axis_name, groups=1, index_groups=None):
    y, mean, var, _ = _bn_train_fwd_impl(x, scale, bias, epsilon, axis_name, groups, index_groups)
    return y, mean, var


def _bn_train_fwd_impl(x, scale, bias, epsilon, axis_name, groups, index_groups):
    mean, var = _moments(x, axis_name, groups, index_groups)
    inv = lax.rsqrt(var + epsilon)
    mul = (scale.astype(jnp.float32) * inv)
    add = bias.astype(jnp.float32) - mean * mul
    xf, _ = _split(x.astype(jnp.float32), groups)
    nd = xf.ndim
    y = (xf * _per_group(mul, groups, nd) + _per_group(add, groups, nd)).reshape(x.shape).astype(x.dtype)
    return y, mean, var, inv


def _bn_train_fwd(x, scale, bias, epsilon, axis_name, groups, index_groups):
    y, mean, var, inv = _bn_train_fwd_impl(x, scale, bias, epsilon, axis_name, groups, index_groups)
    return (y, mean, var), (x, scale, mean, var, inv)


def _bn_train_bwd(epsilon, axis_name, groups, index_groups, res, cts):
    x, scale, mean, var, inv = res
    dy = cts[0]  # the batch statistics are outputs for the running averages only (not differentiated)
    dyf, axes = _split(dy.astype(jnp.float32), groups)
    xf, _ = _split(x.astype(jnp.float32), groups)
    n = 1
    for a in axes:
        n *= xf.shape[a]
    s_dy = jnp.sum(dyf, axes)
    s_dyx = jnp.sum(dyf * xf, axes)
    # local parameter gradients (the train step averages them over devices), summed over the groups
    dbias = s_dy
    dscale = inv * (s_dyx - mean * s_dy)  # sum(dy * xhat)
    if groups > 1:
        dbias, dscale = dbias.sum(0), dscale.sum(0)
    m_dy, m_dyx = s_dy / n, s_dyx / n
    if axis_name is not None:
        # statistics over several devices: the input gradient needs the group's means
        m_dy, m_dyx = lax.pmean((m_dy, m_dyx), axis_name, axis_index_groups=index_groups)
    m_dyxhat = inv * (m_dyx - mean * m_dy)
    # dx = g * (dy - mean(dy) - xhat * mean(dy * xhat)) with g = scale * inv, xhat = (x - mean) * inv, written
    # as (dy * scale - x * k1 + k0) * inv so that no full-size broadcast is shared with the forward pass (XLA
    # would CSE a shared one and write it to memory: a whole extra pass per BN)
    sc = scale.astype(jnp.float32)
    k1 = sc * inv * m_dyxhat
    k0 = k1 * mean - sc * m_dy
    nd = xf.ndim
    dx = (dyf * sc - xf * _per_group(k1, groups, nd) + _per_group(k0, groups, nd)) * _per_group(inv, groups, nd)
    return dx.reshape(x.shape).astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


_bn_train.defvjp(_bn_train_fwd, _bn_train_bwd)


class BatchNorm(nn.Module):
    """Drop-in for ``nn.BatchNorm`` over the last axis (same names, defaults and running-average rule), plus
    ``group_size`` (ghost batch, see ``bn_groups``): the batch statistics of groups of that many images."""

    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    axis_name: str | None = None
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros
    # True: the running variance averages the unbiased batch variance (n / (n - 1) times the biased one, n the
    # elements per channel normalised together), as PyTorch, Caffe and the BN paper's inference rule do;
    # False (default): the biased one, as ``nn.BatchNorm``. Training itself always normalises with the biased one.
    unbiased_running_var: bool = False
    # None: statistics over the device's slice (axis_name None) or the global batch; N: over groups of N images
    # (bn_groups). The running averages move towards the mean over the batch's groups of their statistics.
    group_size: int | None = None

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        ura = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        features = x.shape[-1]
        ra_mean, ra_var, scale, bias = _bn_variables(self, features)
        dtype = self.dtype or jnp.result_type(x, scale)
        x = x.astype(dtype)
        if ura:
            inv = lax.rsqrt(ra_var.value + self.epsilon)
            mul = scale.astype(jnp.float32) * inv
            add = bias.astype(jnp.float32) - ra_mean.value * mul
            return (x.astype(jnp.float32) * mul + add).astype(dtype)
        if self.is_initializing():
            mean, var = _moments(x, None)
            y = x
        else:
            groups, axis_name, index_groups = bn_groups(x.shape[0], self.group_size, self.axis_name)
            y, mean, var = _bn_train(x, scale, bias, self.epsilon, axis_name, groups, index_groups)
            mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
        if not self.is_initializing():
            if self.unbiased_running_var:
                n = x.size // features // groups
                if index_groups is not None:
                    n *= len(index_groups[0])
                elif axis_name is not None:
                    n *= lax.psum(1, axis_name)
                var = var * (n / (n - 1))
            if groups > 1:  # the running averages follow the mean of the groups' statistics
                mean, var = mean.mean(0), var.mean(0)
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y


def _bn_variables(bn: nn.Module, features: int):
    """(running mean, running var, scale, bias) of a BatchNorm module, under ``nn.BatchNorm``'s names and
    initial values: what both ``BatchNorm`` and ``FlaxBatchNorm``'s groups path declare."""
    ra_mean = bn.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (features,))
    ra_var = bn.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (features,))
    return (ra_mean, ra_var, bn.param("scale", bn.scale_init, (features,), bn.param_dtype),
            bn.param("bias", bn.bias_init, (features,), bn.param_dtype))


class FlaxBatchNorm(nn.BatchNorm):
    """``nn.BatchNorm`` (impl "flax") with ``fastops.BatchNorm``'s ``group_size``: without one it is
    ``nn.BatchNorm`` itself; with one, training normalises each group (``bn_groups``) by plain jnp operations
    differentiated by JAX, as ``nn.BatchNorm`` does for its one group (float32 moments, biased variance as
    E[x^2] - E[x]^2, ``lax.pmean`` over the devices a group spans)."""

    group_size: int | None = None

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        ura = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        if ura or self.is_initializing() or self.group_size is None:
            return super().__call__(x, ura)
        groups, axis_name, index_groups = bn_groups(x.shape[0], self.group_size, self.axis_name)
        features = x.shape[-1]
        ra_mean, ra_var, scale, bias = _bn_variables(self, features)
        dtype = self.dtype or jnp.result_type(x, scale)
        xg, axes = _split(x.astype(jnp.float32), groups)
        mean, mean_sq = jnp.mean(xg, axes), jnp.mean(jnp.square(xg), axes)
        if axis_name is not None:
            mean, mean_sq = lax.pmean((mean, mean_sq), axis_name, axis_index_groups=index_groups)
        var = jnp.maximum(0.0, mean_sq - jnp.square(mean))
        stats = (mean.mean(0), var.mean(0)) if groups > 1 else (mean, var)
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * lax.stop_gradient(stats[0])
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * lax.stop_gradient(stats[1])
        nd = xg.ndim
        y = (xg - _per_group(mean, groups, nd)) * _per_group(lax.rsqrt(var + self.epsilon), groups, nd)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.reshape(x.shape).astype(dtype)


# --------------------------------------------------------------------------------------------------------------
# Convolution
# --------------------------------------------------------------------------------------------------------------

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN)


def conv_weight_grad(x, g, w_shape, strides, padding):
    """Weight gradient of ``_conv``: on the CPU ``conv_weight_grad_canonical``, elsewhere autodiff's own.

    GPU/TPU compilers recognise autodiff's form as a backward-filter convolution (cuDNN's on a GPU); the
    explicit form below would hide that from them.
    """

    def autodiff(x, g):
        _, vjp_w = jax.vjp(lambda w_: _conv(x, w_, strides, padding), jnp.zeros(w_shape, x.dtype))
        return vjp_w(g)[0]

    def canonical(x, g):
        return conv_weight_grad_canonical(x, g, w_shape, strides, padding)

    return lax.platform_dependent(x, g, cpu=canonical, default=autodiff)


def conv_weight_grad_canonical(x, g, w_shape, strides, padding):
    """Weight gradient of ``_conv`` as one convolution in the canonical NHWC/HWIO layout.

    The batch becomes the contraction axis: ``dw[a, b, i, o] = sum_{n,h,w} xpad[n, h*s + a, w*s + b, i] * g[n, h,
    w, o]`` is a convolution of ``x`` as (C, H, W, N) with ``g`` as (Ho, Wo, N, K), its window dilated by the
    stride. This is what XLA emits for autodiff's weight gradient outside loops (transposes + canonical conv);
    inside a ``lax.scan`` body XLA keeps autodiff's non-canonical dimension labels and falls back to a
    convolution kernel that is ~10x slower, so the explicit form keeps scanned stages fast.
    """
    kh, kw = w_shape[:2]
    lhs = x.transpose(3, 1, 2, 0)
    rhs = g.transpose(1, 2, 0, 3)
    out = lax.conv_general_dilated(lhs, rhs, (1, 1), padding, rhs_dilation=strides, dimension_numbers=_DN)
    return out[:, :kh, :kw, :].transpose(1, 2, 0, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_fast_dx(x, w, strides, padding):
    return _conv(x, w, strides, padding)


def _conv_fwd(x, w, strides, padding):
    return _conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, res, g):
    x, w = res
    kh, kw = w.shape[:2]
    dw = conv_weight_grad(x, g, w.shape, strides, padding)
    if strides == (1, 1) and padding == ((kh // 2, kh // 2), (kw // 2, kw // 2)):
        # input gradient as a forward "same" convolution with the flipped, transposed kernel
        wt = jnp.flip(w, (0, 1)).swapaxes(2, 3)
        dx = _conv(g, wt, (1, 1), padding)
    else:
        _, vjp_x = jax.vjp(lambda x_: _conv(x_, w, strides, padding), x)
        (dx,) = vjp_x(g)
    return dx.astype(x.dtype), dw.astype(w.dtype)


conv_fast_dx.defvjp(_conv_fwd, _conv_bwd)


class Conv(nn.Module):
    """Drop-in for the ``nn.Conv`` uses of this package (NHWC, no bias, explicit or 'VALID' padding)."""

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = initializers.lecun_normal  # nn.Conv's default (the same values)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.use_bias:
            raise NotImplementedError("fastops.Conv has no bias (every conv of the paper is followed by BN)")
        ks = tuple(self.kernel_size)
        strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
        kernel = self.param("kernel", self.kernel_init, (*ks, x.shape[-1], self.features), self.param_dtype)
        dtype = self.dtype or jnp.result_type(x, kernel)
        padding = self.padding
        if isinstance(padding, str):
            padding = lax.padtype_to_pads(x.shape[1:3], ks, strides, padding)
        padding = tuple(tuple(int(v) for v in p) for p in padding)
        return conv_fast_dx(x.astype(dtype), kernel.astype(dtype), strides, padding)
