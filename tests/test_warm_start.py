"""Warm starts: the CLI keeps compiled programs in the user cache folder (``resflax.xla.compilation_cache``), so
a second ``resflax eval`` of the same run compiles nothing; ``RESFLAX_COMPILATION_CACHE=0`` writes nothing.

Each run is a fresh process with its own ``XDG_CACHE_HOME`` and no ``JAX_COMPILATION_CACHE_DIR`` (the one
conftest.py sets for the session is taken out of the child's environment)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import mock, tiny_config

from resflax.train import loop

ROOT = Path(__file__).resolve().parents[1]
# resflax eval in a fresh process, on the same TFDS mock data the run was trained on
EVAL = ("import sys, tensorflow_datasets as tfds\nfrom resflax import cli\n"
        "with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):\n"
        "    sys.exit(cli.main(['eval', '--workdir', sys.argv[1], '--json']))\n")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.delenv("TFDS_DATA_DIR", raising=False)
    mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    w = tmp_path_factory.mktemp("run") / "w"
    try:
        with mock():
            loop.train_and_evaluate(tiny_config(num_steps=2, lr_boundaries=(1, 2), checkpoint_every_steps=2,
                                                eval_every_steps=2), str(w))
    finally:
        mp.undo()
    return w


def _eval(w: Path, cache_home: Path, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "RESFLAX_COMPILATION_CACHE"))
           and k != "TFDS_DATA_DIR"}
    env.update(XDG_CACHE_HOME=str(cache_home), HOME=str(cache_home / "home"), JAX_PLATFORMS="cpu",
               JAX_LOG_COMPILES="1", JAX_EXPLAIN_CACHE_MISSES="1", **extra)
    p = subprocess.run([sys.executable, "-c", EVAL, str(w)], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _entries(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir() if not p.name.startswith(".")} if cache.is_dir() else set()


def test_second_eval_reads_what_the_first_compiled(run_dir, tmp_path):
    cache = tmp_path / "resflax" / "xla"
    cold = _eval(run_dir, tmp_path)
    first = _entries(cache)
    assert first, "the first run wrote no compiled program in ~/.cache/resflax/xla"
    warm = _eval(run_dir, tmp_path)
    assert _entries(cache) == first, "the second run compiled programs the first one had written"
    # JAX_LOG_COMPILES: each program the first run compiled is a cache hit in the second, none is written again
    assert "Persistent compilation cache hit" in warm.stderr
    assert "PERSISTENT COMPILATION CACHE MISS" not in warm.stderr
    assert cold.stdout.strip().splitlines()[-1] == warm.stdout.strip().splitlines()[-1]  # same result


def test_the_setting_turns_it_off(run_dir, tmp_path):
    _eval(run_dir, tmp_path, RESFLAX_COMPILATION_CACHE="0")
    assert not _entries(tmp_path / "resflax" / "xla")


def test_a_cache_the_user_chose_is_kept(run_dir, tmp_path):
    mine = tmp_path / "mine"
    _eval(run_dir, tmp_path, JAX_COMPILATION_CACHE_DIR=str(mine), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    assert _entries(mine) and not _entries(tmp_path / "resflax" / "xla")


def test_an_unwritable_cache_folder_is_skipped_silently(tmp_path):
    from resflax import xla  # noqa: PLC0415

    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the folder would be: it cannot be made
    saved = {k: os.environ.pop(k) for k in ("JAX_COMPILATION_CACHE_DIR",) if k in os.environ}
    try:
        import jax  # noqa: PLC0415

        before = jax.config.jax_compilation_cache_dir
        jax.config.update("jax_compilation_cache_dir", None)
        try:
            assert xla.compilation_cache(blocker / "xla") is None
            assert jax.config.jax_compilation_cache_dir is None
        finally:
            jax.config.update("jax_compilation_cache_dir", before)
    finally:
        os.environ.update(saved)
