"""ImageNet's English class names ship with resflax (``src/resflax/data/imagenet_classes.txt``, in the package
data) and are torchvision's, index for index: ``python tests/test_class_names.py`` writes the file from the
installed torchvision's weights' metadata (``ResNet50_Weights.IMAGENET1K_V1.meta["categories"]``), and this test
checks that it still says the same."""

from pathlib import Path

import pytest

from resflax.data import imagenet

upstream = pytest.importorskip("upstream")

FILE = Path(__file__).resolve().parents[1] / "src" / "resflax" / "data" / imagenet.CLASS_NAMES_FILE


def torchvision_names() -> tuple[str, list[str]]:
    tv = upstream.import_torchvision()
    from torchvision.models import ResNet50_Weights  # noqa: PLC0415

    return tv.__version__, list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def write() -> None:
    version, names = torchvision_names()
    header = [
        "# ImageNet-1k (ILSVRC2012) class names, one per line, in label order (sorted WordNet ids: n01440764 first).",
        f"# Source: torchvision {version.split('+')[0]}, ResNet50_Weights.IMAGENET1K_V1.meta['categories']",
        "# (torchvision/models/_meta.py; torchvision is BSD-3-Clause, the names come from WordNet, Princeton's",
        "# WordNet license). Written by `python tests/test_class_names.py`.",
    ]
    FILE.write_text("\n".join(header + names) + "\n", encoding="utf-8")


def test_the_shipped_names_are_torchvisions():
    _, names = torchvision_names()
    assert imagenet.class_names() == names
    assert names[0] == "tench" and names[1] == "goldfish" and len(names) == 1000


if __name__ == "__main__":
    write()
    print(f"wrote {FILE}")
