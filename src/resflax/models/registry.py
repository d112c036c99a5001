"""Named models of the paper.

CIFAR-10 (Sec. 4.2, option A, 3 stages of n basic blocks, depth 6n+2): ``resnet20/32/44/56/110/1202``,
``plain20/32/44/56/110`` and any other ``resnet{6n+2}`` / ``plain{6n+2}``.
ImageNet (Table 1, option B): ``resnet18/34/50/101/152`` and ``plain18/34``; the VGG baselines ``vgg16``
and ``vgg19`` (``models.vgg``).

Depths 50 and 152 are both 6n+2 and ImageNet depths; the bare name means the ImageNet model. The prefixes
``cifar_`` and ``imagenet_`` pick a family explicitly (``cifar_resnet50`` is the 8-blocks-per-stage CIFAR net).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from resflax.models.resnet import ResNet
from resflax.models.vgg import VGG

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
_VGG = re.compile(r"^vgg(16|19)$")
VGG_DEPTHS = (16, 19)


def available_models() -> list[str]:
    """The paper's named models (any other ``resnet{6n+2}``/``plain{6n+2}`` CIFAR depth also works)."""
    names = [f"resnet{d}" for d in CIFAR_PAPER_RESNETS] + [f"plain{d}" for d in CIFAR_PAPER_PLAINS]
    names += [f"resnet{d}" for d in IMAGENET] + [f"plain{d}" for d in IMAGENET_PLAIN]
    return names + [f"vgg{d}" for d in VGG_DEPTHS]


class ModelName(NamedTuple):
    """A ResNet/plain model name taken apart: ``prefix`` (``"cifar"``, ``"imagenet"``, or ``None`` for a bare
    name, whose depth then picks the family), ``kind`` (``"resnet"`` or ``"plain"``) and ``depth``."""

    prefix: str | None
    kind: str
    depth: int


def parse_model_name(name: str) -> ModelName | None:
    """``resnet56`` -> ``ModelName(None, "resnet", 56)``, ``cifar_plain20`` -> ``ModelName("cifar", "plain",
    20)``; ``None`` for a name not of the form ``[cifar_|imagenet_](resnet|plain)N`` (``vgg16``, a typo). The
    one reading of these names: whether the depth exists is ``model_spec``'s question."""
    m = _NAME.match(name)
    return ModelName(m.group(1), m.group(2), int(m.group(3))) if m else None


def _unknown(name: str, why: str) -> ValueError:
    return ValueError(
        f"unknown model {name!r} ({why}); available: {', '.join(available_models())}, "
        "or any CIFAR depth 6n+2 (resnet{6n+2}, plain{6n+2}; prefix cifar_/imagenet_ to disambiguate)"
    )


def model_spec(name: str) -> dict[str, Any]:
    """The fields of a named model (before overrides): ``ResNet``'s, or ``VGG``'s for ``vgg16``/``vgg19``;
    raises ``ValueError`` for unknown names."""
    v = _VGG.match(name)
    if v:
        return dict(depth=int(v.group(1)), num_classes=1000, stem="imagenet")
    parsed = parse_model_name(name)
    if parsed is None:
        raise _unknown(name, "not of the form resnetN or plainN")
    family, kind, depth = parsed
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


def model_class(name: str) -> type:
    """``VGG`` for the VGG names, else ``ResNet``."""
    return VGG if _VGG.match(name) else ResNet


def model_fields(name: str) -> set[str]:
    """The fields ``get_model(name, **overrides)`` accepts."""
    return set(model_class(name).__dataclass_fields__) - {"parent", "name"}


def get_model(name: str, **overrides: Any) -> ResNet | VGG:
    """Builds a named model, e.g. ``get_model("resnet110")`` or ``get_model("resnet34", shortcut="C")``.

    Any field of the model's class can be overridden (``shortcut``, ``stride_on_3x3``, ``num_classes``,
    ``dtype``, ...).
    """
    spec = model_spec(name)
    cls = model_class(name)
    unknown = set(overrides) - model_fields(name)
    if unknown:
        raise ValueError(f"unknown model field(s) {sorted(unknown)} for {name!r}")
    spec.update(overrides)
    return cls(**spec)
