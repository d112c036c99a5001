"""ImageNet-style datasets from TFDS, read as ArrayRecord: no TensorFlow at train time, and the images stay
**encoded** so that the loader's workers decode only the crop they need (``data.jpeg``).

Any TFDS dataset with ``train``/``validation`` splits and ``image``/``label`` features works: the real
``imagenet2012``, or one ``data.tiny_imagenet`` writes. Each split is what ``tfds.data_source(name, split=...,
decoders={"image": tfds.decode.SkipDecoding()})`` returns (``SkipDecoding`` works with data sources: the
image feature's ``decode_example_np`` passes the bytes through), but the builder is always made from the
dataset's files (``dataset_info.json``, ``features.json``), never from TFDS's code: so a name TFDS has never
heard of works, and ``imagenet2012`` is found at whatever version it was prepared (TFDS's code builder looks
only for its own latest version). The split sources pickle (grain's spawned workers receive them) and open
their files again in the worker.

``imagenet2012`` must be prepared once from the manual download (TFDS cannot fetch ImageNet): put
``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` in ``<data_dir>/downloads/manual`` (or any dir
given as ``manual_dir``) and run ``resflax prepare-data --dataset imagenet2012`` (``prepare`` below), which
needs TensorFlow (the ``prepare`` extra) that one time.

Every file of both splits is checked against ``dataset_info.json`` when the dataset is opened
(``data.integrity``): a missing or truncated file is a ``DamagedData`` error naming it and the folder to
remove, before anything is written, and ``prepare`` says the same of a damaged earlier preparation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from resflax.data import imagenet
from resflax.data.cifar10 import candidate_dirs
from resflax.data.integrity import DamagedData, check_files
from resflax.errors import DataError
from resflax.lazy import LazyModule
from resflax.quiet import quiet_absl

# imported when a dataset is first opened
tfds = LazyModule("tensorflow_datasets")
read_only_builder = LazyModule("tensorflow_datasets.core.read_only_builder")
registered = LazyModule("tensorflow_datasets.core.registered")

IMAGENET = "imagenet2012"
TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
SPLITS = ("train", "validation")
FEATURES = ("image", "label")


@dataclasses.dataclass(frozen=True)
class ImageNetSource:
    name: str
    data_dir: str  # the candidate data_dir it was found in
    version: str
    num_classes: int
    class_names: list[str]
    train: Any  # indexable, pickles: {"image": encoded bytes, "label": int, ...}
    validation: Any


class Slice:
    """Examples ``[start, stop)`` of a source (picklable: grain workers receive it)."""

    def __init__(self, source, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.source[self.start + int(i)]


def split_train(train, val_examples: int) -> tuple[Any, Any]:
    """``(train, held_out)``: the last ``val_examples`` examples of the training split held out (``held_out`` is
    ``None`` without); ``DataError`` unless ``0 < val_examples < len(train)``."""
    if not val_examples:
        return train, None
    if not 0 < val_examples < len(train):
        raise DataError(f"val_examples must be in (0, {len(train)}), got {val_examples}")
    cut = len(train) - val_examples
    return Slice(train, 0, cut), Slice(train, cut, len(train))


def fingerprint(source, n: int = 4) -> str:
    """A short identity of a split (its size and a few images' bytes): keys the mean cache, and tells a
    resumption whether it reads the same training set."""
    h = hashlib.sha256(str(len(source)).encode())
    for i in np.linspace(0, len(source) - 1, min(n, len(source))).round().astype(int):
        h.update(bytes(source[int(i)]["image"]))
    return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class PixelMean:
    mean: np.ndarray  # (size, size, 3) float32 in [0, 1]
    path: Path  # its cache file
    cached: bool  # read from the cache (else computed now and written there)


def pixel_mean(source: ImageNetSource, train, cache_dir: str | os.PathLike, num_images: int, cfg,
               train_fingerprint: str | None = None) -> PixelMean:
    """The paper's per-pixel mean: the mean image of ``num_images`` images of ``train`` (the training split of
    ``source`` a run uses) as the run's preprocessing ``cfg`` crops them for evaluation, cached under
    ``cache_dir`` by dataset, version, ``fingerprint(train)`` (computed unless given), image count and
    preprocessing. The one place the mean of a run's ImageNet-style data is found (training and reading)."""
    fp = fingerprint(train) if train_fingerprint is None else train_fingerprint
    path = imagenet.mean_cache_path(cache_dir, f"{source.name}-{fp}", source.version, num_images, cfg)
    cached = path.exists()
    mean = imagenet.load_or_compute_mean(path, lambda: imagenet.sample_images(train, num_images), cfg)
    return PixelMean(mean, path, cached)


quiet_tfds = quiet_absl  # TFDS logs a WARNING for every dir it looks into that lacks the dataset


def _how_to_prepare(name: str) -> str:
    if name == IMAGENET:
        return (f"prepare it once: put {' and '.join(TARS)} in <data_dir>/downloads/manual, then `resflax "
                "prepare-data --dataset imagenet2012` (needs `pip install 'resflax[prepare]'`)")
    return "write the small real-photo dataset with `resflax make-tiny-imagenet --out DIR`, or prepare it with TFDS"


def how_to_restore(info, data_dir: str | None = None) -> str:
    """What to do about a damaged copy of the dataset ``info`` describes (its folder
    ``<data_dir>/<name>/<version>``), in one clause."""
    folder = Path(info.data_dir)
    data_dir = data_dir or str(folder.parents[1])
    if info.name == IMAGENET:
        return (f"remove {folder} and prepare it again: `resflax prepare-data --dataset imagenet2012 --data_dir "
                f"{data_dir}` (from the manual download's tars)")
    if info.module_name == "resflax.data.tiny_imagenet":
        name = "" if info.name == "resflax_tiny_jpeg" else f" --name {info.name}"
        return (f"remove {folder} and write it again: `resflax make-tiny-imagenet --out {data_dir}{name}` (same "
                "settings)")
    return f"remove {folder} and prepare it again with TFDS (file_format='array_record')"


# TFDS's imagenet2012 release notes: "2.0.0: Fix validation labels." A preparation by TFDS's builder of an
# earlier version has wrong validation labels (a dataset another builder wrote, e.g. resflax's make-tiny-imagenet
# under this name, is not one of those; a dataset_info.json old enough to lack moduleName is TFDS's).
LABELS_FIXED = "2.0.0"


def _wrong_labels(info) -> bool:
    """Whether ``info`` is an ``imagenet2012`` that TFDS's own builder prepared before it fixed the labels."""
    by_tfds = not (info.module_name or "").startswith("resflax.")
    return info.name == IMAGENET and by_tfds and tfds.core.Version(str(info.version)) < LABELS_FIXED


def _source(builder, name: str, data_dir: str) -> ImageNetSource:
    info = builder.info
    where = f"{name} in {builder.data_dir}"
    if _wrong_labels(info):
        raise DataError(f"{name} {info.version} in {builder.data_dir} has wrong validation labels (TFDS fixed them "
                        f"in version {LABELS_FIXED}): {how_to_restore(info, data_dir)}")
    if "array_record" not in {f.value for f in info.available_file_formats()}:
        raise DataError(f"{where} is stored as {info.file_format.value if info.file_format else '?'}, not "
                        f"ArrayRecord (random access): prepare it again with file_format='array_record' into "
                        f"another data_dir ({_how_to_prepare(name)})")
    missing = [s for s in SPLITS if s not in info.splits] + [f for f in FEATURES if f not in info.features]
    if missing:
        raise DataError(f"{where} lacks the splits/features {', '.join(missing)} (need splits {', '.join(SPLITS)} "
                        f"and features {', '.join(FEATURES)})")
    check_files(info, SPLITS, how_to_restore(info, data_dir))
    train, validation = (builder.as_data_source(split=s, decoders={"image": tfds.decode.SkipDecoding()})
                         for s in SPLITS)
    label = info.features["label"]
    return ImageNetSource(name=name, data_dir=data_dir, version=str(info.version), num_classes=int(label.num_classes),
                          class_names=list(label.names), train=train, validation=validation)


def open_source(name: str = IMAGENET, data_dir: str | None = None) -> ImageNetSource:
    """The first candidate data_dir (an explicit ``data_dir`` alone, else ``$TFDS_DATA_DIR``,
    ``~/tensorflow_datasets``) holding ``name`` in ArrayRecord format, with its latest version there;
    ``DataError`` if none does, ``DamagedData`` as soon as one holds it with a file missing or truncated."""
    tried, unusable = candidate_dirs(data_dir), []
    for d in tried:
        try:
            with quiet_tfds():
                builder = read_only_builder.builder_from_files(name, data_dir=d)
        except registered.DatasetNotFoundError:
            continue
        try:
            return _source(builder, name, d)
        except DamagedData:  # the copy the user meant: never silently another one
            raise
        except DataError as e:  # a later candidate may hold a usable copy
            unusable.append(str(e))
    if unusable:
        raise DataError("; ".join(unusable))
    raise DataError(f"{name} (TFDS ArrayRecord with train and validation splits) not found in: {', '.join(tried)}; "
                    + _how_to_prepare(name))


def _tar_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete tar archive, or None; cheap on a 150 GB tar: three reads. It reads the
    first member's header (checksum: catches a file that is not a tar or whose start is damaged), and checks
    that the size is a whole number of 512-byte blocks and that the file ends with the end-of-archive marker,
    two zero blocks. A copy or download cut short ends in a member's data instead: the check misses only a
    cut at a block boundary right after 1 KiB of zeros inside a member (e.g. in the zero padding that ends an
    inner tar of the train archive), and damage in the middle, which TFDS then reports."""
    cut = (f"{path} is not a complete tar archive ({{}}): copy or download it again (ILSVRC2012 from "
           "image-net.org)")
    try:
        size = path.stat().st_size
        with tarfile.open(path, "r:") as tf:  # reads and checksums the first member's header
            tf.next()
        with open(path, "rb") as f:
            f.seek(max(size - 2 * tarfile.BLOCKSIZE, 0))
            tail = f.read(2 * tarfile.BLOCKSIZE)
    except tarfile.TarError as e:
        return cut.format(f"unreadable header: {e}")
    except OSError as e:
        return f"cannot read {path}: {e.strerror or e}"
    if size % tarfile.BLOCKSIZE:
        return cut.format(f"{size} bytes, not a whole number of {tarfile.BLOCKSIZE}-byte blocks: truncated")
    if size < 3 * tarfile.BLOCKSIZE or tail.count(0) != len(tail):
        return cut.format("no end-of-archive marker: truncated")
    return None


def prepare(data_dir: str | None = None, manual_dir: str | None = None) -> str:
    """Prepares ``imagenet2012`` as ArrayRecord from the manual download (TensorFlow needed this once) into the
    first candidate data_dir, unless a candidate already holds it, checked (``DamagedData`` naming the folder to
    remove if a file of it is missing or truncated); returns that data_dir."""
    try:
        return open_source(IMAGENET, data_dir).data_dir
    except DamagedData:
        raise
    except DataError:
        pass
    target = candidate_dirs(data_dir)[0]
    manual = Path(manual_dir).expanduser() if manual_dir else Path(target) / "downloads" / "manual"
    problems = []  # all of them in one line, so that one attempt shows everything to fix
    if missing := [t for t in TARS if not (manual / t).is_file()]:
        problems.append(f"{' and '.join(missing)} not found in {manual}: download them from image-net.org "
                        "(ILSVRC2012) and put them there, or pass --manual_dir DIR")
    problems += [bad for t in TARS if (manual / t).is_file() and (bad := _tar_problem(manual / t))]
    if importlib.util.find_spec("tensorflow") is None:
        problems.append("preparing imagenet2012 needs TensorFlow once: `pip install 'resflax[prepare]'`")
    if problems:
        raise DataError("; ".join(problems))
    try:
        tfds.builder(IMAGENET, data_dir=target).download_and_prepare(
            file_format="array_record", download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    except Exception as e:  # noqa: BLE001
        why = str(e).splitlines()[0] if str(e) else repr(e)
        raise DataError(f"could not prepare imagenet2012 into {target}: {why}") from e
    return open_source(IMAGENET, target).data_dir
