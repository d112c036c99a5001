"""Shared pytest setup: tests import helpers from this folder (rootdir-relative, no package); the ``pristine``
finished run and ``damage`` are shared by the checkpoint tests."""

import hashlib
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

_SESSION_DIRS: list[str] = []


def pytest_configure(config):
    """Session folders that every test and subprocess shares, removed at the end:

    * one persistent XLA compilation cache (every program, however quick to compile): the many tests and
      subprocesses that build the same tiny networks compile each program once. Keyed by the program and
      the XLA flags, so a hit runs the same executable: results are unchanged. Subprocess tests that set
      their own cache (``run_helpers.env``) use the same folder;
    * resflax's own cache (decoded CIFAR-10, ImageNet means), not the user's ~/.cache: a CLI run after an
      in-process one reads what that one decoded;
    * a TMPDIR for subprocesses, and no temporary folder from TFDS in-process (see ``_no_tfds_temp_leak``).
    """
    import jax  # noqa: PLC0415

    cc, cache, tmp = (tempfile.mkdtemp(prefix=f"resflax-test-{k}-") for k in ("xla", "cache", "tmp"))
    _SESSION_DIRS.extend((cc, cache, tmp))
    os.environ.update(XDG_CACHE_HOME=cache, TMPDIR=tmp, JAX_COMPILATION_CACHE_DIR=cc,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    jax.config.update("jax_compilation_cache_dir", cc)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _no_tfds_temp_leak()


def _no_tfds_temp_leak():
    """TFDS makes an empty temporary folder (``tempfile.mkdtemp("tfds")``) whenever it builds a dataset whose
    files are not there yet, every ``tfds.testing.mock_data`` read included, and never removes it: a suite
    run left ~470 in /tmp. In-process, that folder goes in a temporary folder removed right after;
    subprocesses write theirs in the session's TMPDIR."""
    from tensorflow_datasets.core import dataset_info  # noqa: PLC0415

    original = dataset_info.DatasetInfo.initialize_from_bucket

    def initialize_from_bucket(self):
        with tempfile.TemporaryDirectory(prefix="resflax-test-tfds-") as d:
            saved, tempfile.tempdir = tempfile.tempdir, d
            try:
                return original(self)
            finally:
                tempfile.tempdir = saved

    dataset_info.DatasetInfo.initialize_from_bucket = initialize_from_bucket


# The longest files (~1.5-3 min each on 2 cores), started first when pytest-xdist spreads files over workers
# (``make test``: -n 2 --dist loadfile), so that no long file starts last while the other worker idles.
LONGEST_FIRST = ("test_torch_parity.py", "test_imagenet_train.py", "test_multihost.py", "test_train.py",
                 "test_robustness.py", "test_population.py", "test_scan.py", "test_parallel.py")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


def pytest_unconfigure(config):
    for d in _SESSION_DIRS:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def pristine(tmp_path_factory):
    """A finished tiny run (mock data) with checkpoints 3 and 6, and its digest. Copy it before changing it."""
    from test_train import _ckpt_steps, mock, tiny_config  # noqa: PLC0415

    from resflax.train import loop  # noqa: PLC0415

    w = tmp_path_factory.mktemp("pristine") / "run"
    with mock():
        out = loop.train_and_evaluate(tiny_config(), str(w))
    assert _ckpt_steps(w) == [3, 6]
    return w, out["state_digest"]


def damage(step_dir: Path, how: str) -> None:
    """Damages the bytes of one checkpoint directory in one of four ways."""
    files = sorted((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if how == "truncate":  # every file cut in half
        for f in files:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "garbage":  # the middle of the largest file overwritten
        f = files[-1]
        b = bytearray(f.read_bytes())
        mid = len(b) // 2
        b[mid: mid + 256] = bytes(random.Random(0).randrange(256) for _ in range(len(b[mid: mid + 256])))
        f.write_bytes(bytes(b))
    elif how == "meta":
        (step_dir / "meta" / "metadata").write_text('{"config": ')
    elif how == "empty":
        shutil.rmtree(step_dir / "state")
    else:
        raise ValueError(how)


def tree_snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256), to show that nothing was moved or rewritten."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A small real-JPEG ImageNet-style dataset (4 classes, 16 train / 4 validation images each) for the ImageNet
    path's tests, written once per test module."""
    from resflax.data.tiny_imagenet import write_tiny_dataset  # noqa: PLC0415 (only the modules that use it)

    d = tmp_path_factory.mktemp("tiny_jpeg")
    write_tiny_dataset(str(d), num_classes=4, train_per_class=16, val_per_class=4)
    return d
