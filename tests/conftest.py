"""Shared pytest setup: tests import helpers from this folder (rootdir-relative, no package); the ``pristine``
finished run and ``damage`` are shared by the checkpoint tests."""

import hashlib
import random
import shutil
from pathlib import Path

import pytest


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
