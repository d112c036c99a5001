"""A small ImageNet-like TFDS dataset of real photographs, written without TensorFlow, for the ``:tiny``
config, the tests and anyone who wants to see the ImageNet pipeline run on a CPU.

Each class is one of scikit-image's bundled sample photographs (files inside the package, no download); each
example is a different random crop of it (area 40-100 %, aspect jitter, a mirror half the time) resized to
about ``size`` and stored as a quality-90 JPEG, so images differ within a class and classes are learnable.

The dataset is a genuine TFDS ``ArrayRecord`` dataset (``dataset_info.json``, ``features.json``, shards)
written by TFDS's own ``GeneratorBasedBuilder`` with ``file_format="array_record"``: TFDS serialises
``tf.train.Example`` with its own copy of the protos and writes shards with ``array_record``'s writer, so no
TensorFlow is needed. It has ``imagenet2012``'s feature names (``image``, ``label``, ``file_name``) and splits
(``train``, ``validation``). TFDS writes into ``<name>/incomplete.*`` and renames that to ``<name>/<version>``
when done, so a crash never leaves a dataset that looks complete. Everything is a function of ``seed``.
"""

from __future__ import annotations

import functools
import io
import json
import re
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from resflax.data.imagenet_source import how_to_restore, quiet_tfds
from resflax.data.integrity import check_files
from resflax.errors import DataError

NAME = "resflax_tiny_jpeg"
DESCRIPTION = "resflax tiny real-photo dataset "  # + its settings as JSON

# class name -> its photograph, from the module ``skimage.data``
PHOTOS: dict[str, Callable[[Any], np.ndarray]] = {
    "coffee": lambda sk: sk.coffee(),
    "cat": lambda sk: sk.chelsea(),
    "rocket": lambda sk: sk.rocket(),
    "astronaut": lambda sk: sk.astronaut(),
    "motorcycle": lambda sk: sk.stereo_motorcycle()[0],
    "galaxies": lambda sk: sk.hubble_deep_field(),
    "retina": lambda sk: sk.retina(),
    "camera": lambda sk: np.stack([sk.camera()] * 3, -1),
}


def _photos(num_classes: int) -> list[np.ndarray]:
    try:
        import skimage.data as sk  # noqa: PLC0415 (a test extra, needed only here)
    except ImportError as e:
        raise DataError("the tiny dataset is built from scikit-image's sample photos: "
                        "`pip install 'resflax[test]'`") from e
    return [load(sk) for load in list(PHOTOS.values())[:num_classes]]


def _example(photo: np.ndarray, rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    h, w = photo.shape[:2]
    area = rng.uniform(0.4, 1.0) * h * w
    aspect = (size[0] / size[1]) * np.exp(rng.uniform(-0.2, 0.2))
    cw, ch = min(w, int(round(np.sqrt(area * aspect)))), min(h, int(round(np.sqrt(area / aspect))))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    im = Image.fromarray(photo[top:top + ch, left:left + cw])
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    jitter = rng.uniform(0.9, 1.1)
    im = im.resize((int(size[0] * jitter), int(size[1] * jitter)), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


class _TinyBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes the dataset; it is read back from its files alone (``tfds.data_source``, no registration)."""

    VERSION = tfds.core.Version("1.0.0")
    # No source folder of its own (no checksums, no citation files). Also sidesteps TFDS 4.9.10 looking the
    # module's folder up through `importlib_resources`, a package it does not install.
    code_path = None

    def __init__(self, *, params: dict, photos: list[np.ndarray], **kwargs):
        self.params, self.photos = params, photos
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=DESCRIPTION + json.dumps(self.params, sort_keys=True),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=list(PHOTOS)[: self.params["num_classes"]]),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train", self.params["train_per_class"]),
                "validation": self._generate_examples("validation", self.params["val_per_class"])}

    def _generate_examples(self, split: str, per_class: int):
        p = self.params
        for label, (name, photo) in enumerate(zip(PHOTOS, self.photos)):
            for i in range(per_class):
                rng = np.random.default_rng([p["seed"], split == "train", label, i])
                key = f"{split}-{name}-{i:05d}"
                yield key, {"image": _example(photo, rng, tuple(p["size"])), "label": label,
                            "file_name": f"{key}.JPEG"}


@functools.cache  # TFDS keeps every builder class it sees: one per name
def _builder_cls(name: str) -> type[_TinyBuilder]:
    return type(_TinyBuilder.__name__, (_TinyBuilder,), {"name": name, "__module__": __name__}, skip_registration=True)


def write_tiny_dataset(data_dir: str, name: str = NAME, num_classes: int = 4, train_per_class: int = 16,
                       val_per_class: int = 4, seed: int = 0, size: tuple[int, int] = (160, 120),
                       num_shards: int | None = None) -> str:
    """Writes the dataset ``name`` (images of about ``size`` = (width, height)) into the TFDS ``data_dir``
    and returns ``data_dir``. Once: the same call again reuses it (after checking its files); ``DataError`` if
    ``data_dir`` already holds a ``name`` written with other settings or damaged. ``num_shards``: files per
    split (None: TFDS's choice, one for a dataset this small); the examples and their order are the same."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise DataError(f"dataset name must be snake_case ([a-z][a-z0-9_]*), got {name!r}")
    if not 1 <= num_classes <= len(PHOTOS):
        raise DataError(f"num_classes must be in [1, {len(PHOTOS)}] (one per sample photo), got {num_classes}")
    if train_per_class < 1 or val_per_class < 1:
        raise DataError("train_per_class and val_per_class must be >= 1")
    if num_shards is not None and not 1 <= num_shards <= min(train_per_class, val_per_class) * num_classes:
        raise DataError(f"num_shards must be in [1, the examples of the smaller split], got {num_shards}")
    params = {"num_classes": num_classes, "train_per_class": train_per_class, "val_per_class": val_per_class,
              "seed": seed, "size": list(size)}
    if num_shards is not None:  # only then: the description of a dataset written before stays the same
        params["num_shards"] = num_shards
    with quiet_tfds(), tempfile.TemporaryDirectory() as downloads:  # TFDS makes downloads/extracted: not in data_dir
        builder = _builder_cls(name)(params=params, photos=_photos(num_classes), data_dir=str(data_dir))
        if not builder.is_prepared():
            builder.download_and_prepare(download_dir=downloads, file_format="array_record",
                                         download_config=tfds.download.DownloadConfig(num_shards=num_shards))
        elif (old := tfds.builder_from_directory(builder.data_dir).info).description != builder.info.description:
            raise DataError(f"{builder.data_dir} already holds a dataset written with other settings "
                            f"({old.description.removeprefix(DESCRIPTION)[:200]}); remove it or choose another "
                            "directory")
        else:
            check_files(old, ("train", "validation"), how_to_restore(old))
    return str(data_dir)
