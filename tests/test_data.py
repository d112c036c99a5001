"""CIFAR-10 input through tfds.data_source: mock data, missing data, and the real shared copy."""

import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from resflax.data import cifar10


def test_load_under_tfds_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        d = cifar10.load(str(tmp_path), val_examples=8)
    assert d.train.images.shape == (32, 32, 32, 3) and d.train.images.dtype == np.uint8
    assert d.val.images.shape == (8, 32, 32, 3) and len(d.test) == 40
    assert d.train.labels.dtype == np.int32 and d.train.labels.max() < 10
    np.testing.assert_allclose(d.mean, d.train.images.mean(0) / 255.0, atol=1e-6)


def test_missing_data_names_every_place_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env_dir"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(cifar10.DataError) as e:
        cifar10.find_data_dir()
    msg = str(e.value)
    for place in ("env_dir", "home/tensorflow_datasets"):
        assert place in msg
    assert "prepare-data" in msg
    # an explicit data_dir is the only place looked at
    with pytest.raises(cifar10.DataError) as e:
        cifar10.find_data_dir(str(tmp_path / "cfg_dir"))
    assert "cfg_dir" in str(e.value) and "env_dir" not in str(e.value) and "prepare-data" in str(e.value)
    assert not (tmp_path / "cfg_dir").exists()  # nothing written


def test_val_split_must_fit(tmp_path):
    with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(cifar10.DataError, match="val_examples"):
            cifar10.load(str(tmp_path), val_examples=10)


REAL = os.environ.get("TFDS_DATA_DIR")
needs_real = pytest.mark.skipif(
    not REAL or not (Path(REAL) / "cifar10").exists(), reason="TFDS_DATA_DIR without cifar10"
)


@needs_real
def test_real_cifar10_test_split():
    src = tfds.data_source("cifar10", split="test", data_dir=REAL, download=False)
    split = cifar10._decode(src)
    assert split.images.shape == (10_000, 32, 32, 3)
    assert np.bincount(split.labels, minlength=10).tolist() == [1000] * 10
    assert 100 < split.images.mean() < 150  # real photographs, not noise or zeros


def test_locate_without_tensorflow_explains_how_to_prepare(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env_dir"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tensorflow" else real_find_spec(n, *a))
    with pytest.raises(cifar10.DataError, match="prepare-data"):
        cifar10.locate(str(tmp_path / "cfg"))
    assert not (tmp_path / "cfg").exists()


def test_locate_finds_prepared_data_without_downloading(tmp_path):
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        assert cifar10.locate(str(tmp_path), download=False) == str(tmp_path)


@needs_real
def test_decoded_cache_is_read_back_checked_and_rewritten(tmp_path):
    """``load_split`` caches a split's decoded arrays, reads them back, and decodes again (rewriting the
    cache) when the cached copy is damaged or disagrees with the data; an unwritable cache is skipped."""
    split = "test[:600]"
    ref = cifar10._decode(tfds.data_source("cifar10", split=split, data_dir=REAL, download=False))
    cache = tmp_path / "cache"

    def load(expect_hit, where=cache):
        got, hit = cifar10.load_split(split, REAL, where)
        assert hit == expect_hit
        assert np.array_equal(got.images, ref.images) and np.array_equal(got.labels, ref.labels)
        assert got.labels.dtype == np.int32

    load(False)
    (f,) = cache.glob("cifar10-*-test__600_-decoded-*.npz")
    load(True)
    # a cached copy that disagrees with the data (one of the spot-checked images) is decoded again
    with np.load(f) as z:
        images, labels = z["images"].copy(), z["labels"]
    images[0, 0, 0, 0] ^= 1
    np.savez(f, images=images, labels=labels)
    load(False)
    load(True)
    # a truncated file, and one of another shape
    f.write_bytes(f.read_bytes()[:1000])
    load(False)
    np.savez(f, images=images[:10], labels=labels[:10])
    load(False)
    load(True)
    # another slice of the split is another cache entry
    assert cifar10._cache_path(tfds.data_source("cifar10", split="test[:601]", data_dir=REAL, download=False),
                               "test[:601]", cache) != f
    # a cache dir that cannot be created: the data still loads, nothing is left behind
    blocker = tmp_path / "file"
    blocker.write_text("x")
    load(False, blocker / "cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "file"]
    assert len(list(cache.iterdir())) == 1  # no temporary files


def test_mock_data_is_never_cached(tmp_path):
    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        data = cifar10.load(str(tmp_path / "d"), cache_dir=tmp_path / "cache")
    assert len(data.train) == 8 and not data.cached and not (tmp_path / "cache").exists()
