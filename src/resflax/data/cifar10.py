"""CIFAR-10 from TFDS through ``tfds.data_source`` (ArrayRecord): no TensorFlow import while training.

Each split is decoded once into a uint8 array in memory; augmentation happens on the accelerator
(``resflax.data.augment``). Where the data lives follows TFDS: an explicit ``data_dir``, then
``$TFDS_DATA_DIR``, then ``~/tensorflow_datasets``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from resflax.errors import DataError  # noqa: F401 (raised here; importable from here as before)
from resflax.quiet import quiet_absl

NAME = "cifar10"
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, 32, 32, 3) uint8
    labels: np.ndarray  # (N,) int32

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Cifar10:
    train: Split
    test: Split
    val: Split | None
    data_dir: str
    mean: np.ndarray  # per-pixel mean of the training images, (32, 32, 3) float32 in [0, 1]


def candidate_dirs(data_dir: str | None = None) -> list[str]:
    """The TFDS data_dirs searched, in order."""
    dirs = []
    if data_dir:
        dirs.append(str(Path(data_dir).expanduser()))
    if os.environ.get("TFDS_DATA_DIR"):
        dirs.append(str(Path(os.environ["TFDS_DATA_DIR"]).expanduser()))
    dirs.append(str(Path("~/tensorflow_datasets").expanduser()))
    return list(dict.fromkeys(dirs))


def _open(split: str, data_dir: str):
    import tensorflow_datasets as tfds  # noqa: PLC0415 (imported lazily: heavy)

    return tfds.data_source(NAME, split=split, data_dir=data_dir, download=False)


def find_data_dir(data_dir: str | None = None) -> str:
    """The first candidate data_dir holding CIFAR-10 in ArrayRecord format; ``DataError`` if none does."""
    tried = candidate_dirs(data_dir)
    for d in tried:
        try:
            _open("test", d)
            return d
        except Exception:  # noqa: BLE001 (TFDS raises several types for "not prepared here")
            continue
    raise DataError(
        f"CIFAR-10 (TFDS ArrayRecord) not found in: {', '.join(tried)}. Fix: point --config.data_dir or "
        "TFDS_DATA_DIR at a TFDS data_dir that holds cifar10, or run `resflax prepare-data` "
        "(needs internet and `pip install resflax[prepare]`)."
    )


def prepare(data_dir: str | None = None) -> str:
    """Downloads and prepares CIFAR-10 as ArrayRecord (needs internet and TensorFlow, only this once)."""
    try:
        return find_data_dir(data_dir)
    except DataError:
        pass
    target = candidate_dirs(data_dir)[0]
    try:
        import tensorflow  # noqa: F401, PLC0415 (TFDS's cifar10 builder reads the archive with TF)
    except ImportError as e:
        raise DataError(
            "preparing CIFAR-10 needs TensorFlow: `pip install 'resflax[prepare]'` (or `make data`)"
        ) from e
    import tensorflow_datasets as tfds  # noqa: PLC0415

    try:
        tfds.builder(NAME, data_dir=target).download_and_prepare(file_format="array_record")
    except Exception as e:  # noqa: BLE001
        raise DataError(f"could not download/prepare CIFAR-10 into {target}: {e}") from e
    return find_data_dir(target)


def locate(data_dir: str | None = None, download: bool = True) -> str:
    """``find_data_dir``, and when nothing holds CIFAR-10 and TensorFlow is installed (the ``prepare``
    extra, which ``make data`` installs), downloads and prepares it once into the first candidate dir."""
    try:
        return find_data_dir(data_dir)
    except DataError:
        if not download:
            raise
        import importlib.util  # noqa: PLC0415

        if importlib.util.find_spec("tensorflow") is None:
            raise
    return prepare(data_dir)


def _decode(source) -> Split:
    n = len(source)
    images = np.empty((n, 32, 32, 3), np.uint8)
    labels = np.empty((n,), np.int32)
    chunk = 2048
    # TFDS warns that OpenCV would decode faster than PIL: resflax does not depend on OpenCV on purpose
    with quiet_absl():
        for start in range(0, n, chunk):
            idx = list(range(start, min(n, start + chunk)))
            try:
                examples = source.__getitems__(idx)  # batched read: much faster on ArrayRecord
            except (AttributeError, TypeError):  # sources without it (tfds.testing.mock_data's)
                examples = [source[i] for i in idx]
            for i, ex in zip(idx, examples):
                images[i] = ex["image"]
                labels[i] = ex["label"]
    return Split(images, labels)


def load(data_dir: str | None = None, val_examples: int = 0) -> Cifar10:
    """Decodes the train and test splits into memory.

    Args:
      data_dir: a TFDS data_dir to search first (see ``candidate_dirs``).
      val_examples: if > 0, the last ``val_examples`` training examples (in TFDS's shuffled order) become a
        validation split and are removed from training (the paper's 45k/5k split: 5000).
    """
    d = find_data_dir(data_dir)
    train = _decode(_open("train", d))
    test = _decode(_open("test", d))
    val = None
    if val_examples:
        if not 0 < val_examples < len(train):
            raise DataError(f"val_examples must be in (0, {len(train)}), got {val_examples}")
        val = Split(train.images[-val_examples:], train.labels[-val_examples:])
        train = Split(train.images[:-val_examples], train.labels[:-val_examples])
    mean = train.images.astype(np.float64).mean(axis=0) / 255.0
    return Cifar10(train=train, test=test, val=val, data_dir=d, mean=mean.astype(np.float32))
