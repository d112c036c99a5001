"""Shared pytest setup: tests import helpers from this folder (rootdir-relative, no package); the ``pristine``
finished run and ``damage`` are shared by the checkpoint tests."""

import hashlib
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

_XLA_CACHE: list[str] = []


def pytest_configure(config):
    """One persistent XLA compilation cache for the session's in-process runs: the many tests that train the
    same tiny network compile its step once (the subprocess tests have their own, ``run_helpers.cache_dir``).
    Keyed by the program and the XLA flags, so a hit runs the same executable: results are unchanged."""
    import jax  # noqa: PLC0415

    _XLA_CACHE.append(tempfile.mkdtemp(prefix="resflax-test-xla-"))
    # resflax's own cache (decoded CIFAR-10, ImageNet means) in a session folder, not the user's ~/.cache;
    # subprocesses inherit it, so a CLI run after an in-process one reads what that one decoded
    _XLA_CACHE.append(tempfile.mkdtemp(prefix="resflax-test-cache-"))
    os.environ["XDG_CACHE_HOME"] = _XLA_CACHE[1]
    jax.config.update("jax_compilation_cache_dir", _XLA_CACHE[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
    for d in _XLA_CACHE:
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
