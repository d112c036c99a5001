"""Shared test helper: the real torchvision, the reference the weight tests compare against
(``import_torchvision()`` skips the calling test when it is absent).

The PyPI torchvision wheel carries C++ operators built against its own CUDA torch; beside the CPU torch they do
not load, and its import then stops at ``register_fake("torchvision::nms")``, which needs the operator's schema.
Declaring the schemas of the operators it registers fake kernels for (detection ops, which its models never
call) lets the rest import unchanged."""

import importlib.util
import sys

import pytest

# torchvision 0.28's torchvision/_meta_registrations.py registers fake kernels for these without checking that
# its C++ library loaded; the schemas as torchvision/csrc/ops/nms.cpp declares them.
SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY = []  # keeps the definitions alive


def import_torchvision():
    """The installed torchvision (skips the test without it or without torch)."""
    torch = pytest.importorskip("torch")
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed")
    try:
        import torchvision  # noqa: PLC0415
    except RuntimeError:  # its C++ operators did not load: declare the schemas its Python code needs
        for name in list(sys.modules):
            if name == "torchvision" or name.startswith("torchvision."):
                del sys.modules[name]
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for name, schema in SCHEMAS.items():
            if not _declared(torch, name):
                lib.define(schema)
        _LIBRARY.append(lib)
        import torchvision  # noqa: PLC0415
    return torchvision


def _declared(torch, name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True
