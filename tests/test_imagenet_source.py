"""ImageNet-style TFDS sources: the tiny real-photo dataset written without TensorFlow (atomically, as a
function of the seed), read back from its files as encoded JPEGs (also in a spawned worker process and through
the grain pipeline), and the one-line errors of lookup and preparation."""

import importlib.util
import io
import json
import multiprocessing
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resflax import cli
from resflax.data import imagenet_input, imagenet_source, sharding, tiny_imagenet
from resflax.errors import DataError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tiny_imagenet.write_tiny_dataset(str(d))
    return imagenet_source.open_source(tiny_imagenet.NAME, str(d))


def test_the_tiny_dataset_is_real_jpegs_with_labels(tiny):
    assert (len(tiny.train), len(tiny.validation), tiny.num_classes) == (64, 16, 4)
    assert tiny.class_names == ["coffee", "cat", "rocket", "astronaut"] and tiny.version == "1.0.0"
    assert "tensorflow" not in sys.modules
    labels = [tiny.train[i]["label"] for i in range(64)]
    assert np.bincount(labels).tolist() == [16] * 4
    assert np.bincount([ex["label"] for ex in tiny.validation.__getitems__(range(16))]).tolist() == [4] * 4
    assert [ex["image"] for ex in tiny.train.__getitems__([3, 1])] == [tiny.train[3]["image"], tiny.train[1]["image"]]
    by_class = {}
    for i in range(64):
        ex = tiny.train[i]
        assert ex["image"][:2] == b"\xff\xd8"  # encoded, not decoded
        im = Image.open(io.BytesIO(ex["image"]))
        assert im.format == "JPEG" and 140 <= im.size[0] <= 180 and 105 <= im.size[1] <= 135
        by_class.setdefault(ex["label"], []).append(np.asarray(im.convert("RGB").resize((32, 24)), float))
    for imgs in by_class.values():  # examples of a class are different crops of its photo
        assert min(np.abs(a - b).mean() for i, a in enumerate(imgs) for b in imgs[i + 1:]) > 1.0


def test_writing_is_a_function_of_the_seed(tiny, tmp_path):
    again = imagenet_source.open_source(tiny_imagenet.NAME, tiny_imagenet.write_tiny_dataset(str(tmp_path / "a")))
    other = imagenet_source.open_source(tiny_imagenet.NAME,
                                        tiny_imagenet.write_tiny_dataset(str(tmp_path / "b"), seed=1))
    same = sorted(bytes(again.train[i]["image"]) for i in range(64))
    assert same == sorted(bytes(tiny.train[i]["image"]) for i in range(64))
    assert not set(same) & {bytes(other.train[i]["image"]) for i in range(64)}
    with pytest.raises(DataError, match="other settings"):
        tiny_imagenet.write_tiny_dataset(str(tmp_path / "a"), seed=2)


def _read(source, indices):
    return len(source), [bytes(ex["image"]) for ex in source.__getitems__(indices)], "tensorflow" in sys.modules


def test_a_split_source_works_in_a_spawned_worker(tiny):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        got = pool.apply(_read, (tiny.train, [0, 5, 63]))
    assert got == _read(tiny.train, [0, 5, 63]) and got[0] == 64 and not got[2]


def test_a_crash_while_writing_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def crash(*_):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(tiny_imagenet, "_example", crash)
        with pytest.raises(KeyboardInterrupt):
            tiny_imagenet.write_tiny_dataset(str(tmp_path), num_classes=1, train_per_class=2, val_per_class=1)
    with pytest.raises(DataError, match="not found"):
        imagenet_source.open_source(tiny_imagenet.NAME, str(tmp_path))
    tiny_imagenet.write_tiny_dataset(str(tmp_path), num_classes=1, train_per_class=2, val_per_class=1)
    assert len(imagenet_source.open_source(tiny_imagenet.NAME, str(tmp_path)).train) == 2


def test_without_scikit_image_the_writer_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage.data", None)  # import fails
    with pytest.raises(DataError, match=r"pip install 'resflax\[test\]'"):
        tiny_imagenet.write_tiny_dataset(str(tmp_path))
    assert not list(tmp_path.iterdir())


def test_imagenet2012_is_read_from_its_files_at_any_version(tmp_path):
    """TFDS's own imagenet2012 code looks only for version 5.1.0; the files alone say what is there."""
    tiny_imagenet.write_tiny_dataset(str(tmp_path), name="imagenet2012", num_classes=2, train_per_class=2,
                                     val_per_class=1)
    src = imagenet_source.open_source(data_dir=str(tmp_path))
    assert (src.name, src.version, src.class_names, len(src.train)) == ("imagenet2012", "1.0.0", ["coffee", "cat"], 4)
    assert src.validation[0]["image"][:2] == b"\xff\xd8"


def test_an_imagenet2012_prepared_before_its_validation_labels_were_fixed_is_refused(tmp_path, capsys, monkeypatch):
    """TFDS's imagenet2012 release notes: "2.0.0: Fix validation labels". A preparation by TFDS's builder at an
    earlier version is refused in one line naming both versions; from 2.0.0 on it is read."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # experiments/
    tiny_imagenet.write_tiny_dataset(str(tmp_path / "d"), name="imagenet2012", num_classes=2, train_per_class=2,
                                     val_per_class=1)
    old = tmp_path / "d" / "imagenet2012" / "1.0.0"
    info = old / "dataset_info.json"  # as TFDS's own builder wrote it (TFDS 2.x-4.x's module)
    info.write_text(json.dumps({**json.loads(info.read_text()),
                                "moduleName": "tensorflow_datasets.image_classification.imagenet"}))
    with pytest.raises(DataError, match=r"imagenet2012 1\.0\.0 in .* has wrong validation labels \(TFDS fixed them "
                                        r"in version 2\.0\.0\): remove .*1\.0\.0 and prepare it again"):
        imagenet_source.open_source("imagenet2012", str(tmp_path / "d"))
    capsys.readouterr()
    rc = cli.main(["train", "--config=experiments/imagenet.py:tiny", "--config.dataset=imagenet2012",
                   f"--config.data_dir={tmp_path / 'd'}", f"--workdir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "1.0.0" in err and "version 2.0.0" in err, err
    # the same files as version 2.0.0 (labels fixed) are read
    info.write_text(json.dumps({**json.loads(info.read_text()), "version": "2.0.0"}))
    old.rename(old.with_name("2.0.0"))
    assert imagenet_source.open_source("imagenet2012", str(tmp_path / "d")).version == "2.0.0"


def test_a_dataset_not_in_array_record_format_is_named(tiny, tmp_path, monkeypatch):
    shutil.copytree(tiny.data_dir, tmp_path, dirs_exist_ok=True)
    info = tmp_path / tiny_imagenet.NAME / "1.0.0" / "dataset_info.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "fileFormat": "tfrecord"}))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # an explicit data_dir is the only place looked at: a usable copy elsewhere is not taken instead
    monkeypatch.setenv("TFDS_DATA_DIR", tiny.data_dir)
    with pytest.raises(DataError, match="stored as tfrecord, not ArrayRecord"):
        imagenet_source.open_source(tiny_imagenet.NAME, str(tmp_path))
    # without one, the search order goes on past an unusable copy
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    (tmp_path / "home" / "tensorflow_datasets").mkdir(parents=True)
    shutil.copytree(tiny.data_dir, tmp_path / "home" / "tensorflow_datasets", dirs_exist_ok=True)
    assert imagenet_source.open_source(tiny_imagenet.NAME).data_dir == str(tmp_path / "home" / "tensorflow_datasets")


def test_the_grain_pipeline_reads_it(tiny):
    stream = sharding.Stream(len(tiny.train), 8, seed=0)
    batches = list(imagenet_input.loader(imagenet_input.train_dataset(tiny.train, stream, num_steps=2)))
    assert len(batches) == 2
    assert batches[0]["image"].shape == (8, 224, 224, 3) and batches[0]["image"].dtype == np.uint8
    assert batches[0]["label"].tolist() == [tiny.train[int(i)]["label"] for i in stream.step_examples(0)[1]]


def test_a_missing_dataset_names_the_dirs_tried_and_how_to_prepare(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(DataError) as e:
        imagenet_source.open_source("imagenet2012", str(tmp_path / "given"))
    msg = str(e.value)  # an explicit data_dir is the only place looked at
    assert f"not found in: {tmp_path / 'given'};" in msg and "ILSVRC2012_img_train.tar" in msg and "prepare-data" in msg
    assert len(msg.splitlines()) == 1
    with pytest.raises(DataError) as e:
        imagenet_source.open_source("imagenet2012")
    dirs = [str(tmp_path / d) for d in ("env", "home/tensorflow_datasets")]
    assert f"not found in: {', '.join(dirs)};" in str(e.value)
    with pytest.raises(DataError, match="make-tiny-imagenet"):
        imagenet_source.open_source("resflax_tiny_jpeg", str(tmp_path / "given"))


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="checks the error without TensorFlow")
def test_prepare_imagenet_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    rc = cli.main(["prepare-data", "--dataset", "imagenet2012", "--data_dir", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar not found in" in err
    assert str(tmp_path / "d" / "downloads" / "manual") in err
    manual = tmp_path / "tars"
    manual.mkdir()
    for t in imagenet_source.TARS:
        (manual / t).write_bytes(b"")
    rc = cli.main(["prepare-data", "--dataset", "imagenet2012", "--data_dir", str(tmp_path / "d"),
                   "--manual_dir", str(manual)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "needs TensorFlow" in err
    rc = cli.main(["prepare-data", "--manual_dir", str(manual)])
    assert rc == 2 and "imagenet2012 only" in capsys.readouterr().err


def test_make_tiny_imagenet_command(tmp_path, capsys):
    assert cli.main(["make-tiny-imagenet", "--out", str(tmp_path), "--num_classes", "2",
                     "--train_per_class", "3", "--val_per_class", "1"]) == 0
    assert "6 train / 2 validation" in capsys.readouterr().out
    src = imagenet_source.open_source(tiny_imagenet.NAME, str(tmp_path))
    assert (len(src.train), len(src.validation), src.num_classes) == (6, 2, 2)
    assert cli.main(["make-tiny-imagenet", "--out", str(tmp_path), "--name", "my_tiny", "--num_classes", "1",
                     "--train_per_class", "2", "--val_per_class", "1", "--seed", "3"]) == 0
    assert "my_tiny ready in" in capsys.readouterr().out
    assert imagenet_source.open_source("my_tiny", str(tmp_path)).class_names == ["coffee"]
    assert cli.main(["make-tiny-imagenet", "--out", str(tmp_path / "x"), "--num_classes", "99"]) == 2
    assert "num_classes must be in" in capsys.readouterr().err
