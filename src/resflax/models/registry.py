"""Named models of the paper.

CIFAR-10 (Sec. 4.2, option A, 3 stages of n basic blocks, depth 6n+2): ``resnet20/32/44/56/110/1202``,
``plain20/32/44/56/110`` and any other ``resnet{6n+2}`` / ``plain{6n+2}``.
ImageNet (Table 1, option B): ``resnet18/34/50/101/152`` and ``plain18/34``.

Depths 50 and 152 are both 6n+2 and ImageNet depths; the bare name means the ImageNet model. The prefixes
``cifar_`` and ``imagenet_`` pick a family explicitly (``cifar_resnet50`` is the 8-blocks-per-stage CIFAR net).
"""

from __future__ import annotations

import re
from typing import Any

from resflax.models.resnet import ResNet

IMAGENET = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
IMAGENET_PLAIN = (18, 34)
CIFAR_PAPER_RESNETS = (20, 32, 44, 56, 110, 1202)
CIFAR_PAPER_PLAINS = (20, 32, 44, 56, 110)

_NAME = re.compile(r"^(?:(cifar|imagenet)_)?(resnet|plain)(\d+)$")


def available_models() -> list[str]:
    """The paper's named models (any other ``resnet{6n+2}``/``plain{6n+2}`` CIFAR depth also works)."""
    names = [f"resnet{d}" for d in CIFAR_PAPER_RESNETS] + [f"plain{d}" for d in CIFAR_PAPER_PLAINS]
    names += [f"resnet{d}" for d in IMAGENET] + [f"plain{d}" for d in IMAGENET_PLAIN]
    return names


def _unknown(name: str, why: str) -> ValueError:
    return ValueError(
        f"unknown model {name!r} ({why}); available: {', '.join(available_models())}, "
        "or any CIFAR depth 6n+2 (resnet{6n+2}, plain{6n+2}; prefix cifar_/imagenet_ to disambiguate)"
    )


def model_spec(name: str) -> dict[str, Any]:
    """The ``ResNet`` fields of a named model (before overrides); raises ``ValueError`` for unknown names."""
    m = _NAME.match(name)
    if not m:
        raise _unknown(name, "not of the form resnetN or plainN")
    family, kind, depth = m.group(1), m.group(2), int(m.group(3))
    residual = kind == "resnet"
    if family is None:
        family = "imagenet" if depth in IMAGENET and (residual or depth in IMAGENET_PLAIN) else "cifar"
    if family == "imagenet":
        if depth not in IMAGENET or (not residual and depth not in IMAGENET_PLAIN):
            raise _unknown(name, f"no ImageNet {kind} of depth {depth}")
        block, sizes = IMAGENET[depth]
        return dict(
            stage_sizes=sizes,
            widths=(64, 128, 256, 512),
            block=block,
            stem="imagenet",
            stem_width=64,
            shortcut="B",
            residual=residual,
            num_classes=1000,
        )
    if depth < 8 or (depth - 2) % 6:
        raise _unknown(name, f"CIFAR depth must be 6n+2 with n >= 1, got {depth}")
    n = (depth - 2) // 6
    return dict(
        stage_sizes=(n, n, n),
        widths=(16, 32, 64),
        block="basic",
        stem="cifar",
        stem_width=16,
        shortcut="A",
        residual=residual,
        num_classes=10,
    )


def get_model(name: str, **overrides: Any) -> ResNet:
    """Builds a named model, e.g. ``get_model("resnet110")`` or ``get_model("resnet34", shortcut="C")``.

    Any ``ResNet`` field can be overridden (``shortcut``, ``stride_on_3x3``, ``num_classes``, ``dtype``, ...).
    """
    spec = model_spec(name)
    unknown = set(overrides) - set(ResNet.__dataclass_fields__) - {"parent", "name"}
    if unknown:
        raise ValueError(f"unknown model field(s) {sorted(unknown)} for {name!r}")
    spec.update(overrides)
    return ResNet(**spec)
