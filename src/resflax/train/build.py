"""A run's network from its config: the one place the config's model settings become a model, for training
(``loop.plan``) and for every path that reads a run (``evaluate.restore``: eval, predict, export, responses).
Below the loop: it imports neither ``loop``, ``tasks`` nor ``population``."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from resflax import configs
from resflax.errors import BadInput
from resflax.models import get_model, model_fields
from resflax.train.step import AXIS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(config) -> Any:
    """The config's ``dtype`` as a JAX dtype; ``BadInput`` for one resflax does not train in."""
    if config.dtype == "float16":
        raise BadInput("dtype float16 needs loss scaling, which resflax does not implement; use bfloat16 (float32 "
                       "range, no scaling needed) or float32")
    if config.dtype not in DTYPES:
        raise BadInput(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    return DTYPES[config.dtype]


def bn_groups(config) -> tuple[str | None, int | None]:
    """The model's ``(bn_axis_name, bn_group_size)`` from the config: one mechanism, three ways to name a group
    (``fastops.bn_groups``): ``bn_group_size`` N > 0: groups of N images whatever the devices; 0: each
    device's slice (no axis); ``bn_sync``: the whole batch (the axis, no size). ``BadInput`` when
    ``bn_sync`` contradicts a group size."""
    size = config.get("bn_group_size") or 0
    if config.bn_sync:
        if size not in (0, config.batch_size):
            raise BadInput(f"bn_sync=True normalises over the whole batch of {config.batch_size}, not groups of "
                           f"bn_group_size={size}: set one of them")
        return AXIS, None
    return (AXIS, size) if size else (None, None)


def check_bn_groups(config, num_devices: int) -> None:
    """``BadInput`` (one line) unless ``bn_group_size`` can be honoured on ``num_devices`` devices: it divides
    the batch, and it divides each device's slice or is a whole number of slices."""
    size, batch = config.get("bn_group_size") or 0, config.batch_size
    if not size or "bn_group_size" not in model_fields(config.model):
        return
    local = batch // num_devices
    if batch % size:
        raise BadInput(f"bn_group_size {size} does not divide batch_size {batch}")
    if local % size and size % local:
        raise BadInput(f"bn_group_size {size} cannot be formed from {num_devices} devices of {local} images each: "
                       "a group must divide a device's images or be a whole number of devices' images")


def model_from_config(config, num_classes: int | None = None) -> Any:
    """``config.model`` with the run's settings (``pad_layout``, ``stride_on_3x3``, ``zero_init_last_bn``,
    ``dtype``, the BatchNorm groups (``bn_groups``), and ``shortcut``, ``impl``, ``conv_init``, ``scan_min_blocks``
    where set; a VGG ignores those of the ResNet family) and ``num_classes`` (None: the model's own). Builds the
    module only: no parameters. ``BadInput`` for a setting that cannot be used (an unknown model, a bad dtype
    or field value)."""
    try:
        overrides = dict(pad_layout=config.pad_layout, stride_on_3x3=config.stride_on_3x3,
                         zero_init_last_bn=config.zero_init_last_bn, dtype=compute_dtype(config))
        overrides["bn_axis_name"], overrides["bn_group_size"] = bn_groups(config)
        for key in ("shortcut", "impl", "conv_init"):  # (conv_init: absent from runs made before it)
            if config.get(key) is not None:
                overrides[key] = config[key]
        if config.get("scan_min_blocks") is not None:
            configs.check("scan_min_blocks", config.scan_min_blocks)  # its range is defined once, in configs.KEYS
            overrides["scan_min_blocks"] = config.scan_min_blocks or None
        if num_classes is not None:
            overrides["num_classes"] = num_classes
        # settings of the ResNet family that a model without them (VGG) ignores
        overrides = {k: v for k, v in overrides.items() if k in model_fields(config.model)}
        return get_model(config.model, **overrides)
    except (ValueError, TypeError, KeyError) as e:  # the model's fields validate the values
        if isinstance(e, BadInput):
            raise
        raise BadInput(str(e).splitlines()[0] if str(e) else type(e).__name__) from e
