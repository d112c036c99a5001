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


def model_from_config(config, num_classes: int | None = None) -> Any:
    """``config.model`` with the run's settings (``pad_layout``, ``stride_on_3x3``, ``zero_init_last_bn``,
    ``dtype``, ``bn_sync``, and ``shortcut``, ``impl``, ``conv_init``, ``scan_min_blocks`` where set; a VGG
    ignores those of the ResNet family) and ``num_classes`` (None: the model's own). Builds the module only: no
    parameters. ``BadInput`` for a setting that cannot be used (an unknown model, a bad dtype or field value)."""
    try:
        overrides = dict(pad_layout=config.pad_layout, stride_on_3x3=config.stride_on_3x3,
                         zero_init_last_bn=config.zero_init_last_bn, dtype=compute_dtype(config),
                         bn_axis_name=AXIS if config.bn_sync else None)
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
