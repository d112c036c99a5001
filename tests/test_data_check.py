"""A dataset's files are checked against its ``dataset_info.json`` before anything is written (issue 23): a
missing or truncated shard of any split a run reads is refused at the start with exit 2, one line naming the
file and what to do, and no workdir; ``resflax prepare-data`` and ``make-tiny-imagenet`` say the same of a
damaged earlier preparation instead of "ready"."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from resflax import cli
from resflax.data import integrity

ROOT = Path(__file__).resolve().parents[1]
NAME = "resflax_tiny_jpeg"
REAL = os.environ.get("TFDS_DATA_DIR")
needs_cifar = pytest.mark.skipif(not REAL or not (Path(REAL) / "cifar10").is_dir(),
                                 reason="TFDS_DATA_DIR without cifar10")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The tiny dataset written as 4 files per split (the same examples in the same order as one file)."""
    from resflax.data.tiny_imagenet import write_tiny_dataset  # noqa: PLC0415

    d = tmp_path_factory.mktemp("tiny_sharded")
    write_tiny_dataset(str(d), num_shards=4)
    return d


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _shard(data: Path, split: str, i: int, name: str = NAME) -> Path:
    (folder,) = (data / name).iterdir()  # the one version
    return folder / f"{name}-{split}.array_record-{i:05d}-of-00004"


def _damage(f: Path, how: str) -> None:
    if how == "missing":
        f.unlink()
    else:
        os.truncate(f, f.stat().st_size // 2)


def _train(capsys, workdir: Path, *args: str) -> tuple[int, str]:
    rc = cli.main(["train", *args, "--config.num_steps=2", "--config.eval_every_steps=2", "--config.progress=False",
                   f"--workdir={workdir}"])
    return rc, capsys.readouterr().err.strip()


@pytest.mark.parametrize("split", ["train", "validation"])
@pytest.mark.parametrize("how", ["missing", "truncated"])
def test_a_damaged_shard_is_refused_before_anything_is_written(sharded, tmp_path, capsys, split, how):
    data = _copy(sharded, tmp_path / "data")
    bad = _shard(data, split, 2)
    _damage(bad, how)
    rc, err = _train(capsys, tmp_path / "run", "--config=experiments/imagenet.py:tiny", f"--config.data_dir={data}",
                     f"--config.mean_cache_dir={tmp_path / 'cache'}")
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert str(bad) in err and f"({split} file 3 of 4)" in err and how.replace("missing", "is missing") in err, err
    assert f"remove {bad.parent} and write it again" in err and "make-tiny-imagenet" in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_the_intact_sharded_dataset_passes_and_a_restored_file_is_accepted_again(sharded, tmp_path):
    from resflax.data import imagenet_source  # noqa: PLC0415

    data = _copy(sharded, tmp_path / "data")
    src = imagenet_source.open_source(NAME, str(data))
    assert (len(src.train), len(src.validation)) == (64, 16)
    f = _shard(data, "train", 0)
    kept = f.read_bytes()
    _damage(f, "truncated")  # after a first check passed: the changed file is read again
    with pytest.raises(integrity.DamagedData, match="truncated or damaged: .* 0 of its 16 records"):
        imagenet_source.open_source(NAME, str(data))
    f.write_bytes(kept)
    assert len(imagenet_source.open_source(NAME, str(data)).train) == 64


@pytest.mark.slow
def test_the_command_line_exits_2_with_one_line(sharded, tmp_path):
    """The same through a real process: its exit code and everything on stderr."""
    data = _copy(sharded, tmp_path / "data")
    _damage(_shard(data, "validation", 3), "missing")
    r = subprocess.run([sys.executable, "-m", "resflax.cli", "train", "--config=experiments/imagenet.py:tiny",
                        f"--config.data_dir={data}", "--config.loader_workers=2", f"--workdir={tmp_path / 'run'}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
    assert "validation.array_record-00003-of-00004 (validation file 4 of 4) is missing" in r.stderr
    assert not (tmp_path / "run").exists()


def test_make_tiny_imagenet_does_not_reuse_a_damaged_copy(sharded, tmp_path):
    from resflax.data.tiny_imagenet import write_tiny_dataset  # noqa: PLC0415

    data = _copy(sharded, tmp_path / "data")
    bad = _shard(data, "validation", 1)
    _damage(bad, "missing")
    with pytest.raises(integrity.DamagedData, match=f"{bad}.* is missing; remove {bad.parent} and write it again"):
        write_tiny_dataset(str(data), num_shards=4)


def test_prepare_data_imagenet_names_what_to_remove(tmp_path, capsys):
    """A damaged earlier preparation of imagenet2012 (here the tiny photos under that name): not "ready"."""
    from resflax.data.tiny_imagenet import write_tiny_dataset  # noqa: PLC0415

    data = tmp_path / "data"
    write_tiny_dataset(str(data), name="imagenet2012", train_per_class=4, val_per_class=1, num_shards=4)
    assert cli.main(["prepare-data", "--dataset", "imagenet2012", "--data_dir", str(data)]) == 0
    assert "imagenet2012 ready" in capsys.readouterr().out
    bad = _shard(data, "train", 3, name="imagenet2012")
    _damage(bad, "truncated")
    assert cli.main(["prepare-data", "--dataset", "imagenet2012", "--data_dir", str(data)]) == 2
    out = capsys.readouterr()
    assert "ready" not in out.out and len(out.err.strip().splitlines()) == 1, out
    assert str(bad) in out.err and f"remove {bad.parent} and prepare it again: `resflax prepare-data --dataset " \
        f"imagenet2012 --data_dir {data}`" in out.err, out.err


# ---- CIFAR-10: a copy of the shared folder with one file gone or cut short -------------------------------------


@pytest.fixture
def cifar_copy(tmp_path):
    """``<tmp>/data/cifar10/<version>``: the metadata copied, the shards linked to the shared (read-only) ones."""
    (src,) = (Path(REAL) / "cifar10").iterdir()
    dst = tmp_path / "data" / "cifar10" / src.name
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if "array_record" in f.name:
            os.symlink(f, dst / f.name)
        else:
            shutil.copy(f, dst / f.name)
    return dst


def _cut(link: Path) -> Path:
    """Replaces the link by a copy of the first half of its file."""
    data = link.read_bytes()
    link.unlink()
    link.write_bytes(data[: len(data) // 2])
    return link


@needs_cifar
@pytest.mark.parametrize("how", ["missing", "truncated"])
def test_a_damaged_cifar10_copy_is_refused_and_prepare_data_says_what_to_remove(cifar_copy, tmp_path, capsys, how):
    bad = cifar_copy / "cifar10-test.array_record-00000-of-00001"
    if how == "missing":
        bad.unlink()
    else:
        _cut(bad)
    data = cifar_copy.parents[1]
    rc, err = _train(capsys, tmp_path / "run", "--config=experiments/cifar10.py:resnet20", f"--config.data_dir={data}")
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{bad} (test file 1 of 1) " in err and f"remove {cifar_copy} and prepare it again" in err, err
    assert not (tmp_path / "run").exists()
    # a damaged copy first in line is an error, not skipped for the intact one in TFDS_DATA_DIR
    assert cli.main(["prepare-data", "--data_dir", str(data)]) == 2
    out = capsys.readouterr()
    assert "ready" not in out.out and str(bad) in out.err and f"--data_dir {data}" in out.err, out
