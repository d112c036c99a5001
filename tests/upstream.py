"""Shared test helper: the real torchvision and timm, the references that preprocessing and weight tests compare
against. ``import_torchvision()`` and ``import_timm()`` return the module, or skip the calling test when it is
not installed (the test extra pins both).

The PyPI torchvision wheel's C++ operators (``_C.so``) are built for its own torch build and do not load beside
the CPU torch; torchvision's import then stops at ``torch.library.register_fake("torchvision::nms")``, which
needs the operator's schema. Declaring the schemas it registers Python kernels for (two detection operators;
torchvision's models and transforms never call them) lets everything else import unchanged."""

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

# What torchvision 0.28 registers fake kernels for without checking that its C++ library loaded
# (torchvision/_meta_registrations.py), with the schemas its C++ declares (torchvision/csrc/ops/nms.cpp).
SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

_LIBRARIES = []  # a torch.library.Library's definitions last as long as the object


def import_torchvision():
    """The installed torchvision, importable beside a torch its C++ operators were not built for."""
    torch = pytest.importorskip("torch")
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        pytest.skip("torchvision is not installed (pip install -e '.[test]')")
    if "torchvision" not in sys.modules:
        for so in sorted(Path(spec.origin).parent.glob("_C*")):  # what torchvision.extension would load
            try:
                torch.ops.load_library(str(so))
            except OSError:
                pass
        missing = [s for name, s in SCHEMAS.items() if not hasattr(torch.ops.torchvision, name)]
        if missing:
            lib = torch.library.Library("torchvision", "DEF")
            for schema in missing:
                lib.define(schema)
            _LIBRARIES.append(lib)
    return importlib.import_module("torchvision")


def import_timm():
    """The installed timm (it imports torchvision: declared first, as ``import_torchvision`` does)."""
    import_torchvision()
    return pytest.importorskip("timm")
