"""One parameterised family for every network of the paper (plain and residual, CIFAR and ImageNet).

Parameter paths read ``stem_conv``, ``stem_bn``, ``stage{i}/block{j}/conv{k}``, ``.../bn{k}``,
``.../shortcut/{conv,bn}`` and ``fc``; stages are numbered from 1 (the paper's conv2_x is ``stage1``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resflax import xla as _xla
from resflax.models import fastops, initializers
from resflax.models.blocks import BasicBlock, BottleneckBlock, ModuleDef

_xla.configure()  # default XLA flags must be in place before the backend starts

BLOCKS = {"basic": BasicBlock, "bottleneck": BottleneckBlock}
STEMS = ("cifar", "imagenet")
IMPLS = ("fast", "flax")

# He et al. (2015) "Delving deep into rectifiers": N(0, 2 / fan_in), not truncated (JAX's initialiser, compiled
# faster on the CPU: the same values, see initializers.py). The paper initialises "as in [13]", that paper, which
# shows both N(0, 2 / fan_in) (forward signal) and N(0, 2 / fan_out) (backward signal) keep deep rectifier nets
# trainable; fb.resnet.torch and torchvision use fan-out: ``conv_init="fan_out"``.
he_normal = initializers.he_normal
CONV_INITS = {"fan_in": he_normal, "fan_out": initializers.variance_scaling(2.0, "fan_out", "normal")}


def _stack(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def scans(num_blocks: int, scan_min_blocks: int | None) -> bool:
    """Whether a stage of ``num_blocks`` blocks runs blocks 1..n-1 as a ``lax.scan``."""
    return scan_min_blocks is not None and num_blocks > 1 and num_blocks >= scan_min_blocks


def packed_name(num_blocks: int) -> str:
    """Key under which a scanned stage's blocks 1..n-1 may be held stacked (see ``pack_blocks``)."""
    return f"block1-{num_blocks - 1}"


class Stage(nn.Module):
    """A stack of blocks at one resolution; the first block downsamples by ``strides``.

    With ``scan_min_blocks`` set and at least that many blocks, blocks 1..n-1 (all of one shape) run as one
    ``lax.scan`` over their stacked parameters instead of being unrolled, so the compiled program, and its
    compile time, stay the size of a shallow net's. It is only a way of executing the stage: initialisation is
    the unrolled one and gives the per-block names ``block{j}/...``; the variables may hold those blocks either
    per block (stacked on every call) or already stacked under ``block1-{n-1}`` (``pack_blocks``; what the train
    state holds, so that the step has a few stacked leaves instead of thousands). A call that collects
    ``intermediates`` (Fig. 7) unrolls and needs per-block variables (``unpack_blocks``).
    """

    block_cls: Any
    num_blocks: int
    filters: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    block_kwargs: dict
    scan_min_blocks: int | None = None
    scan_unroll: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        kwargs = dict(filters=self.filters, conv=self.conv, norm=self.norm, **self.block_kwargs)
        key = packed_name(self.num_blocks)
        packed = self.num_blocks > 1 and self.has_variable("params", key)
        scanned = (
            scans(self.num_blocks, self.scan_min_blocks)
            and not self.is_initializing()
            and not self.is_mutable_collection("intermediates")
        )
        if packed and not scanned:
            raise ValueError(
                f"{self.name}: blocks 1..{self.num_blocks - 1} are packed under {key!r}, which only a scanned "
                "stage reads; unpack them first (resflax.models.unpack_blocks)"
            )
        for j in range(1 if scanned else self.num_blocks):
            x = self.block_cls(strides=self.strides if j == 0 else 1, name=f"block{j}", **kwargs)(x, train)
        if not scanned:
            return x
        template = self.block_cls(strides=1, parent=None, **kwargs)
        names = [f"block{j}" for j in range(1, self.num_blocks)]
        if packed:
            params, stats = self.get_variable("params", key), self.get_variable("batch_stats", key)
        else:
            params = _stack([self.get_variable("params", nm) for nm in names])
            stats = _stack([self.get_variable("batch_stats", nm) for nm in names])

        def body(h, v):
            p, s = v
            if not train:
                return template.apply({"params": p, "batch_stats": s}, h, False), None
            h, new = template.apply({"params": p, "batch_stats": s}, h, True, mutable=["batch_stats"])
            return h, new["batch_stats"]

        x, new_stats = lax.scan(body, x, (params, stats), unroll=self.scan_unroll)
        if train and packed:
            self.put_variable("batch_stats", key, new_stats)
        elif train:
            for j, nm in enumerate(names):
                self.put_variable("batch_stats", nm, jax.tree.map(lambda a, j=j: a[j], new_stats))
        return x


def _scanned_stages(model) -> list[tuple[str, int]]:
    sizes = getattr(model, "stage_sizes", ())  # models without stages (VGG) scan nothing
    return [(f"stage{i + 1}", n) for i, n in enumerate(sizes) if scans(n, model.scan_min_blocks)]


def _is_variables(tree: Any) -> bool:
    return isinstance(tree, dict) and bool({"params", "batch_stats", "intermediates"} & set(tree))


def pack_blocks(model, tree: Any) -> Any:
    """Stacks blocks 1..n-1 of every stage ``model`` scans into one entry ``stage{i}/block1-{n-1}``.

    ``tree`` is a collection laid out like the parameters (``params``, ``batch_stats``, or an optimizer's
    per-parameter state), or a ``{"params": ..., "batch_stats": ...}`` variables dict. Stages that are
    unrolled, and trees already packed, are returned unchanged. ``unpack_blocks`` is the exact inverse.
    """
    if _is_variables(tree):
        return {k: pack_blocks(model, v) for k, v in tree.items()}
    out = dict(tree)
    for stage, n in _scanned_stages(model):
        if stage not in out or "block1" not in out[stage]:
            continue
        st = dict(out[stage])
        blocks = [st.pop(f"block{j}") for j in range(1, n)]
        st[packed_name(n)] = _stack(blocks)
        out[stage] = st
    return out


def unpack_blocks(model, tree: Any) -> Any:
    """Inverse of ``pack_blocks``: per-block entries ``stage{i}/block{j}`` again."""
    if _is_variables(tree):
        return {k: unpack_blocks(model, v) for k, v in tree.items()}
    out = dict(tree)
    for stage, n in _scanned_stages(model):
        key = packed_name(n)
        if stage not in out or key not in out[stage]:
            continue
        st = dict(out[stage])
        stacked = st.pop(key)
        for j in range(1, n):
            st[f"block{j}"] = jax.tree.map(lambda a, j=j: a[j - 1], stacked)
        out[stage] = st
    return out


class ResNet(nn.Module):
    """A plain or residual network of He et al. (2015).

    Attributes:
      stage_sizes: blocks per stage, e.g. ``(3, 3, 3)`` for CIFAR ResNet-20, ``(3, 4, 6, 3)`` for ResNet-50.
      widths: filters of each stage's 3x3 convs (bottleneck output is 4x), e.g. ``(16, 32, 64)``.
      block: ``"basic"`` or ``"bottleneck"``.
      stem: ``"cifar"`` (3x3/16 conv) or ``"imagenet"`` (7x7/2 conv + 3x3/2 max-pool).
      stem_width: filters of the stem conv (16 on CIFAR, 64 on ImageNet).
      shortcut: ``"A"``, ``"B"`` or ``"C"`` (Sec. 3.3); ignored when ``residual`` is False.
      residual: False removes every shortcut (the paper's "plain" network of the same shape).
      pad_layout: option-A zero-channel layout, ``"append"`` (after the real channels) or ``"split"``.
      stride_on_3x3: bottleneck only: False = paper (v1), True = v1.5.
      zero_init_last_bn: initialise the last BN scale of each block to zero (off in the paper).
      conv_init: the conv kernels' He normal init, N(0, 2 / fan_in) (``"fan_in"``) or N(0, 2 / fan_out)
        (``"fan_out"``: fb.resnet.torch, torchvision); fan = kernel height x width x input (output) channels.
      num_classes: size of the final fully-connected layer.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); param_dtype: storage dtype of the parameters.
      bn_momentum: Flax convention (running = m * running + (1 - m) * batch); PyTorch's 0.1 is Flax's 0.9.
      bn_axis_name: mesh axis over which BN statistics are averaged (synchronised BN), or None.
      bn_group_size: None: BN statistics over each device's slice (``bn_axis_name`` None) or the global batch;
        N: over groups of N images (ghost batch, ``fastops.bn_groups``), whatever the device count: groups
        within a device are normalised alone, a group spanning devices averages over them (``bn_axis_name``).
      bn_unbiased_var: running variance from the unbiased batch variance (PyTorch, Caffe); needs impl "fast".
      residual_gate: None (default), or a scalar multiplying every shortcut (1: residual, 0: plain), which may be
        a traced value: a population (``train.population``) trains plain-n and ResNet-n members of one
        parameter shape (option A) in one vmapped program. Needs ``residual=True``. Multiplying by 1 or 0
        and adding is exact, so a member computes what the static ``residual=True``/``False`` network does.
      impl: ``"fast"`` (default): ``fastops.Conv``/``fastops.BatchNorm`` with hand-written gradients;
        ``"flax"``: ``nn.Conv``/``nn.BatchNorm`` (``fastops.FlaxBatchNorm``, for groups).
        Same parameters, same numerics up to float rounding.
      barriers: optimisation barrier after every block, so the backward pass reads stored activations
        instead of recomputing BN/add/ReLU chains (numerically a no-op). Off by default: XLA:CPU removes
        optimisation barriers before fusion, so they do nothing there (see docs/performance.md).
      scan_min_blocks: a stage with at least this many blocks runs its blocks after the first as one
        ``lax.scan`` (see ``Stage``): compile time stays flat in depth (ResNet-1202). None: always unrolled.
        The default, 64, leaves every paper model but ResNet-1202 unrolled, which is faster per step.
      scan_unroll: blocks per iteration of that scan (``lax.scan``'s ``unroll``).
    """

    stage_sizes: Sequence[int]
    widths: Sequence[int]
    block: str = "basic"
    stem: str = "cifar"
    stem_width: int = 16
    shortcut: str = "A"
    residual: bool = True
    pad_layout: str = "append"
    stride_on_3x3: bool = False
    zero_init_last_bn: bool = False
    conv_init: str = "fan_in"
    num_classes: int = 10
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_axis_name: str | None = None
    bn_group_size: int | None = None
    bn_unbiased_var: bool = False
    residual_gate: Any = None
    impl: str = "fast"
    barriers: bool = False
    scan_min_blocks: int | None = 64
    scan_unroll: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.block not in BLOCKS:
            raise ValueError(f"unknown block {self.block!r}; expected one of {tuple(BLOCKS)}")
        if self.stem not in STEMS:
            raise ValueError(f"unknown stem {self.stem!r}; expected one of {STEMS}")
        if len(self.stage_sizes) != len(self.widths):
            raise ValueError("stage_sizes and widths must have the same length")
        if self.impl not in IMPLS:
            raise ValueError(f"unknown impl {self.impl!r}; expected one of {IMPLS}")
        if self.conv_init not in CONV_INITS:
            raise ValueError(f"unknown conv_init {self.conv_init!r}; expected one of {tuple(CONV_INITS)}")
        if self.residual_gate is not None and not self.residual:
            raise ValueError("residual_gate needs residual=True (the gate multiplies the shortcut)")
        fast = self.impl == "fast"
        conv_cls, norm_cls = (fastops.Conv, fastops.BatchNorm) if fast else (nn.Conv, fastops.FlaxBatchNorm)
        norm_extra = {}
        if self.bn_unbiased_var:
            if self.impl != "fast":
                raise ValueError("bn_unbiased_var needs impl='fast' (nn.BatchNorm keeps the biased variance)")
            norm_extra["unbiased_running_var"] = True
        relu = fastops.relu if self.impl == "fast" else nn.relu
        conv = functools.partial(
            conv_cls, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=CONV_INITS[self.conv_init],
        )
        norm = functools.partial(
            norm_cls,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            axis_name=self.bn_axis_name,
            group_size=self.bn_group_size,
            **norm_extra,
        )
        block_cls = BLOCKS[self.block]
        block_kwargs = dict(
            residual=self.residual,
            shortcut=self.shortcut,
            pad_layout=self.pad_layout,
            zero_init_last_bn=self.zero_init_last_bn,
            barrier=self.barriers,
            act=relu,
        )
        if self.residual_gate is not None:
            block_kwargs["gate"] = self.residual_gate
        if self.block == "bottleneck":
            block_kwargs["stride_on_3x3"] = self.stride_on_3x3

        x = jnp.asarray(x, self.dtype)
        if self.stem == "cifar":
            x = conv(self.stem_width, (3, 3), padding=((1, 1), (1, 1)), name="stem_conv")(x)
        else:
            x = conv(self.stem_width, (7, 7), strides=2, padding=((3, 3), (3, 3)), name="stem_conv")(x)
        x = norm(name="stem_bn")(x, use_running_average=not train)
        self.sow("intermediates", "stem_bn_out", x)
        x = relu(x)
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, (n, w) in enumerate(zip(self.stage_sizes, self.widths)):
            x = Stage(
                block_cls,
                n,
                w,
                1 if i == 0 else 2,
                conv,
                norm,
                block_kwargs,
                self.scan_min_blocks,
                self.scan_unroll,
                name=f"stage{i + 1}",
            )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="fc",
                     kernel_init=initializers.lecun_normal)(x)  # Flax's default, compiled faster on the CPU
        return jnp.asarray(x, jnp.float32)
