"""Parameter and multiply-add counts of a model, computed from the model's own definition.

Multiply-adds are counted for convolutions and fully-connected layers (as in the paper's Table 1), by
intercepting each convolution (any module with ``kernel_size`` and ``features``) and ``nn.Dense`` call
during an abstract (shape-only) forward pass.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resflax.models import get_model, model_spec

# The paper's figures (PAPER.md): params of Table 6 / torchvision counts; multiply-adds of Table 1.
PAPER = {
    "resnet20": dict(params=269_722, error=8.75),
    "resnet32": dict(params=464_154, error=7.51),
    "resnet44": dict(params=658_586, error=7.17),
    "resnet56": dict(params=853_018, error=6.97),
    "resnet110": dict(params=1_727_962, error=6.43),
    "resnet1202": dict(params=19_421_274, error=7.93),
    "resnet18": dict(params=11_689_512, mult_adds=1.8e9),
    "resnet34": dict(params=21_797_672, mult_adds=3.6e9),
    "resnet50": dict(params=25_557_032, mult_adds=3.8e9),
    "resnet101": dict(params=44_549_160, mult_adds=7.6e9),
    "resnet152": dict(params=60_192_808, mult_adds=11.3e9),
    # Plain nets: the same counts as the option-A ResNets (PAPER.md Sec. 4).
    **{f"plain{d}": dict(params=p)
       for d, p in ((20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018), (110, 1_727_962))},
    "plain18": dict(mult_adds=1.8e9),
    "plain34": dict(mult_adds=3.6e9),
    # Fig. 3 / Table 3 baselines: multiply-adds of the paper's Fig. 3 text; parameters of torchvision's vgg16/19
    "vgg16": dict(params=138_357_544, mult_adds=15.3e9),
    "vgg19": dict(params=143_667_240, mult_adds=19.6e9),
}


def input_shape(name: str) -> tuple[int, int, int]:
    return (224, 224, 3) if model_spec(name)["stem"] == "imagenet" else (32, 32, 3)


def count(model: nn.Module, image_shape: tuple[int, int, int]) -> dict[str, int]:
    """Parameters and multiply-adds per image of ``model`` on one image of ``image_shape`` (HWC)."""
    macs = 0

    def interceptor(next_fun, args, kwargs, context):
        nonlocal macs
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            mod = context.module
            # Any convolution layer (nn.Conv or a drop-in with the same fields) counts.
            if hasattr(mod, "kernel_size") and hasattr(mod, "features"):
                x = args[0]
                k = math.prod(mod.kernel_size) * x.shape[-1] // getattr(mod, "feature_group_count", 1)
                macs += math.prod(out.shape[1:]) * k
            elif isinstance(mod, nn.Dense):
                macs += math.prod(out.shape[1:]) * args[0].shape[-1]
        return out

    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    with nn.intercept_methods(interceptor):
        variables = jax.eval_shape(lambda v: model.init(jax.random.PRNGKey(0), v, train=False), x)
    params = sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(variables["params"]))
    return {"params": int(params), "mult_adds": int(macs)}


def summary(name: str, **overrides: Any) -> dict[str, Any]:
    """Counts of a named model beside the paper's figures (keys ``model``, ``params``, ``mult_adds``, ...)."""
    model = get_model(name, **overrides)
    shape = input_shape(name)
    c = count(model, shape)
    paper = PAPER.get(name, {}) if not overrides else {}
    return {
        "model": name,
        "input": list(shape),
        "params": c["params"],
        "mult_adds": c["mult_adds"],
        "paper_params": paper.get("params"),
        "paper_mult_adds": paper.get("mult_adds"),
        "paper_test_error": paper.get("error"),
    }
