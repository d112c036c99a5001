"""CIFAR-10 from TFDS through ``tfds.data_source`` (ArrayRecord): no TensorFlow import while training.

Each split is decoded once into a uint8 array in memory; augmentation happens on the accelerator
(``resflax.data.augment``). Decoding the 60,000 images takes 20-40 s (TFDS's per-example decoding, one core),
so the decoded arrays are cached (``load(cache_dir=...)``: ``~/.cache/resflax`` by default from the CLI) and
later starts, resumptions and ``resflax eval`` read them in a fraction of a second. Where the data lives
follows TFDS: an explicit ``data_dir`` (alone), else ``$TFDS_DATA_DIR``, then ``~/tensorflow_datasets``. The
copy found is checked against its ``dataset_info.json`` (``data.integrity``): a missing or truncated file of
the train or test split is a ``DamagedData`` error naming it and the folder to remove, before anything is
written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import zipfile
from pathlib import Path

import numpy as np

from resflax.data.files import save_atomically
from resflax.data.integrity import DamagedData, check_files
from resflax.errors import DataError
from resflax.lazy import LazyModule
from resflax.quiet import quiet_absl

tfds = LazyModule("tensorflow_datasets")  # imported when a dataset is first opened

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
    cached: bool = False  # both splits were read from the decoded-array cache


def candidate_dirs(data_dir: str | None = None) -> list[str]:
    """The TFDS data_dirs searched, in order: an explicit ``data_dir`` is the only one (a dataset that is not
    there is not looked for elsewhere); without it ``$TFDS_DATA_DIR``, then ``~/tensorflow_datasets``."""
    if data_dir:
        return [str(Path(data_dir).expanduser())]
    dirs = []
    if os.environ.get("TFDS_DATA_DIR"):
        dirs.append(str(Path(os.environ["TFDS_DATA_DIR"]).expanduser()))
    dirs.append(str(Path("~/tensorflow_datasets").expanduser()))
    return list(dict.fromkeys(dirs))


def _open(split: str, data_dir: str):
    return tfds.data_source(NAME, split=split, data_dir=data_dir, download=False)


SPLITS = ("train", "test")


def how_to_restore(info, data_dir: str) -> str:
    return (f"remove {info.data_dir} and prepare it again: `resflax prepare-data --data_dir {data_dir}` (needs "
            "internet and `pip install 'resflax[prepare]'`)")


def find_data_dir(data_dir: str | None = None) -> str:
    """The first candidate data_dir holding CIFAR-10 in ArrayRecord format; ``DataError`` if none does,
    ``DamagedData`` if the first one that does lacks a file or holds a truncated one."""
    tried = candidate_dirs(data_dir)
    for d in tried:
        try:
            info = _open("test", d).dataset_info
        except Exception:  # noqa: BLE001 (TFDS raises several types for "not prepared here")
            continue
        check_files(info, SPLITS, how_to_restore(info, d))
        return d
    raise DataError(
        f"CIFAR-10 (TFDS ArrayRecord) not found in: {', '.join(tried)}. Fix: point --config.data_dir or "
        "TFDS_DATA_DIR at a TFDS data_dir that holds cifar10, or run `resflax prepare-data` "
        "(needs internet and `pip install resflax[prepare]`)."
    )


def prepare(data_dir: str | None = None) -> str:
    """Downloads and prepares CIFAR-10 as ArrayRecord (needs internet and TensorFlow, only this once), unless a
    candidate data_dir holds it already, checked (``DamagedData`` naming the folder to remove if a file of it
    is missing or truncated)."""
    try:
        return find_data_dir(data_dir)
    except DamagedData:
        raise
    except DataError:
        pass
    target = candidate_dirs(data_dir)[0]
    try:
        # TFDS's cifar10 builder reads the archive with TF: an optional extra (heavy), needed only here, once
        import tensorflow  # noqa: F401, PLC0415
    except ImportError as e:
        raise DataError(
            "preparing CIFAR-10 needs TensorFlow: `pip install 'resflax[prepare]'` (or `make data`)"
        ) from e
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
    except DamagedData:
        raise
    except DataError:
        if not download:
            raise
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


def _cache_path(source, split: str, cache_dir: Path) -> Path | None:
    """Where ``split``'s decoded arrays are cached: keyed by the dataset version, the split and its
    ArrayRecord files' names and sizes. None for sources without files (``tfds.testing.mock_data``)."""
    try:
        info = source.dataset_info
        files = sorted(Path(info.data_dir).glob(f"{NAME}-{split.split('[')[0]}.array_record-*"))
    except (AttributeError, OSError, TypeError):
        return None
    if not files or not hasattr(source, "__getitems__"):
        return None
    h = hashlib.sha256(f"{info.version}|{split}|{len(source)}".encode())
    for f in files:
        h.update(f"|{f.name}:{f.stat().st_size}".encode())
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in split)  # "train[:500]" -> "train__500_"
    return Path(cache_dir) / f"{NAME}-{info.version}-{name}-decoded-{h.hexdigest()[:16]}.npz"


def _spot_check(source, split: Split, n: int = 8) -> bool:
    """The cached arrays agree with ``n`` examples decoded now (spread over the split)."""
    idx = [int(i) for i in np.linspace(0, len(source) - 1, n).round()]
    with quiet_absl():
        examples = source.__getitems__(idx)
    return all(np.array_equal(split.images[i], ex["image"]) and split.labels[i] == ex["label"]
               for i, ex in zip(idx, examples))


def _read_cache(path: Path, source) -> Split | None:
    try:
        with np.load(path) as z:
            split = Split(z["images"], z["labels"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # absent, truncated or not ours: decode again (and rewrite it)
    n = len(source)
    if split.images.shape != (n, 32, 32, 3) or split.images.dtype != np.uint8 or split.labels.shape != (n,):
        return None
    if not _spot_check(source, split):
        return None
    return Split(split.images, split.labels.astype(np.int32))


def _write_cache(path: Path, split: Split) -> None:
    """Atomically (``files.save_atomically``); a cache that cannot be written is skipped."""
    try:
        save_atomically(path, lambda f: np.savez(f, images=split.images, labels=split.labels))
    except OSError:
        pass


def load_split(split: str, data_dir: str, cache_dir: str | os.PathLike | None = None) -> tuple[Split, bool]:
    """One split decoded (or read from ``cache_dir``'s copy, checked against a few freshly decoded examples);
    returns it and whether it came from the cache."""
    source = _open(split, data_dir)
    path = _cache_path(source, split, Path(cache_dir)) if cache_dir else None
    if path is not None and (hit := _read_cache(path, source)) is not None:
        return hit, True
    out = _decode(source)
    if path is not None:
        _write_cache(path, out)
    return out, False


def load(data_dir: str | None = None, val_examples: int = 0,
         cache_dir: str | os.PathLike | None = None) -> Cifar10:
    """Decodes the train and test splits into memory.

    Args:
      data_dir: a TFDS data_dir to search first (see ``candidate_dirs``).
      val_examples: if > 0, the last ``val_examples`` training examples (in TFDS's shuffled order) become a
        validation split and are removed from training (the paper's 45k/5k split: 5000).
      cache_dir: if given, each split's decoded arrays are cached there (and read from there next time).
    """
    d = find_data_dir(data_dir)
    train, hit_train = load_split("train", d, cache_dir)
    test, hit_test = load_split("test", d, cache_dir)
    val = None
    if val_examples:
        if not 0 < val_examples < len(train):
            raise DataError(f"val_examples must be in (0, {len(train)}), got {val_examples}")
        val = Split(train.images[-val_examples:], train.labels[-val_examples:])
        train = Split(train.images[:-val_examples], train.labels[:-val_examples])
    mean = train.images.astype(np.float64).mean(axis=0) / 255.0
    return Cifar10(train=train, test=test, val=val, data_dir=d, mean=mean.astype(np.float32),
                   cached=hit_train and hit_test)
