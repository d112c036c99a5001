"""Building blocks of the paper (Sec. 3.3, Fig. 2 and Fig. 5) and its shortcut options A, B, C.

Every convolution is followed by BatchNorm, then ReLU; convolutions carry no bias; the ReLU of a residual
block comes after the addition. Each block sows the output of its convolutions after BN and before the
ReLU/addition into the ``intermediates`` collection as ``bn1_out``, ``bn2_out``, ... (a sown name may not
equal a submodule's), which is what the paper's Fig. 7 (layer responses) measures; sowing is free unless
that collection is made mutable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from resflax.models.fastops import barrier as _barrier

ModuleDef = Callable[..., nn.Module]
Array = Any

SHORTCUT_OPTIONS = ("A", "B", "C")
PAD_LAYOUTS = ("append", "split")


def option_a(x: Array, out_channels: int, strides: int, layout: str = "append") -> Array:
    """Parameter-free shortcut (option A): stride-``strides`` subsampling plus zero channels.

    Args:
      x: NHWC input.
      out_channels: channels of the block's output; ``out_channels - C_in`` zero channels are added.
      strides: spatial subsampling factor (takes pixels 0, s, 2s, ... like a 1x1 stride-s conv).
      layout: where the zeros go. ``"append"`` puts them after the real channels (fb.resnet.torch);
        ``"split"`` puts half before and half after (akamaster/pytorch_resnet_cifar10).
    """
    if strides > 1:
        x = x[:, ::strides, ::strides, :]
    extra = out_channels - x.shape[-1]
    if extra < 0:
        raise ValueError(f"option A cannot reduce channels ({x.shape[-1]} -> {out_channels})")
    if extra == 0:
        return x
    if layout == "append":
        pad = (0, extra)
    elif layout == "split":
        pad = (extra // 2, extra - extra // 2)
    else:
        raise ValueError(f"unknown option-A layout {layout!r}; expected one of {PAD_LAYOUTS}")
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), pad))


def _gated(gate: Any, shortcut: Array) -> Array:
    """The shortcut times the gate (exact for a gate of 0 or 1), or unchanged without one."""
    return shortcut if gate is None else shortcut * jnp.asarray(gate, shortcut.dtype)


class Shortcut(nn.Module):
    """The shortcut connection of a residual block.

    Option ``A``: identity, or parameter-free subsampling + zero channels where shapes change.
    Option ``B``: identity, or a 1x1 projection (conv + BN) where shapes change.
    Option ``C``: a 1x1 projection (conv + BN) on every block.
    """

    option: str
    out_channels: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    pad_layout: str = "append"

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if self.option not in SHORTCUT_OPTIONS:
            raise ValueError(f"unknown shortcut option {self.option!r}; expected one of {SHORTCUT_OPTIONS}")
        changes = self.strides != 1 or x.shape[-1] != self.out_channels
        if self.option == "C" or (self.option == "B" and changes):
            y = self.conv(self.out_channels, (1, 1), strides=self.strides, padding="VALID", name="conv")(x)
            return self.norm(name="bn")(y, use_running_average=not train)
        if not changes:
            return x
        return option_a(x, self.out_channels, self.strides, self.pad_layout)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (Fig. 5 left): used by ResNet-18/34 and every CIFAR net."""

    filters: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    residual: bool = True
    shortcut: str = "A"
    pad_layout: str = "append"
    zero_init_last_bn: bool = False
    barrier: bool = False  # optimisation barrier on the output (see fastops.barrier); numerically a no-op
    act: Callable = nn.relu  # ReLU implementation (fastops.relu: same values and gradient, cheaper backward)
    gate: Any = None  # None, or a (traceable) scalar multiplying the shortcut: 1 = residual, 0 = plain

    expansion = 1

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        ura = not train
        y = self.conv(self.filters, (3, 3), strides=self.strides, padding=((1, 1), (1, 1)), name="conv1")(x)
        y = self.norm(name="bn1")(y, use_running_average=ura)
        self.sow("intermediates", "bn1_out", y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
        last_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        y = self.norm(name="bn2", scale_init=last_init)(y, use_running_average=ura)
        self.sow("intermediates", "bn2_out", y)
        if self.residual:
            y = y + _gated(self.gate, Shortcut(
                self.shortcut, self.filters, self.strides, self.conv, self.norm, self.pad_layout, name="shortcut"
            )(x, train))
        y = self.act(y)
        return _barrier(y) if self.barrier else y


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3, 1x1 restore to 4x (Fig. 5 right): ResNet-50/101/152.

    ``stride_on_3x3=False`` is the paper's released models (stride 2 on the first 1x1, "v1");
    ``True`` moves it to the 3x3 conv ("v1.5": torchvision, the Flax ImageNet example).
    """

    filters: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    residual: bool = True
    shortcut: str = "B"
    pad_layout: str = "append"
    zero_init_last_bn: bool = False
    stride_on_3x3: bool = False
    barrier: bool = False
    act: Callable = nn.relu
    gate: Any = None

    expansion = 4

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        ura = not train
        s1, s3 = (1, self.strides) if self.stride_on_3x3 else (self.strides, 1)
        y = self.conv(self.filters, (1, 1), strides=s1, padding="VALID", name="conv1")(x)
        y = self.norm(name="bn1")(y, use_running_average=ura)
        self.sow("intermediates", "bn1_out", y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3), strides=s3, padding=((1, 1), (1, 1)), name="conv2")(y)
        y = self.norm(name="bn2")(y, use_running_average=ura)
        self.sow("intermediates", "bn2_out", y)
        y = self.act(y)
        y = self.conv(self.filters * 4, (1, 1), padding="VALID", name="conv3")(y)
        last_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        y = self.norm(name="bn3", scale_init=last_init)(y, use_running_average=ura)
        self.sow("intermediates", "bn3_out", y)
        if self.residual:
            y = y + _gated(self.gate, Shortcut(
                self.shortcut, self.filters * 4, self.strides, self.conv, self.norm, self.pad_layout,
                name="shortcut",
            )(x, train))
        y = self.act(y)
        return _barrier(y) if self.barrier else y
