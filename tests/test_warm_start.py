"""Warm starts: the CLI keeps compiled programs in the user cache folder (``resflax.xla.compilation_cache``), so
a second ``resflax eval`` of the same run compiles nothing; ``RESFLAX_COMPILATION_CACHE=0`` writes nothing.

Each run is a fresh process with its own ``XDG_CACHE_HOME`` and no ``JAX_COMPILATION_CACHE_DIR`` (the one
conftest.py sets for the session is taken out of the child's environment)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train import mock, tiny_config

from resflax.train import loop

ROOT = Path(__file__).resolve().parents[1]
# `resflax ARGV` in a fresh process, on the same TFDS mock data the run was trained on
CLI = ("import sys, tensorflow_datasets as tfds\nfrom resflax import cli\n"
       "with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):\n"
       "    sys.exit(cli.main(sys.argv[1:]))\n")

pytestmark = pytest.mark.slow


def _trained(tmp_path_factory, name: str, **config) -> Path:
    """A tiny run trained on TFDS mock data with ``config``, in a fresh folder ``name``/w."""
    mp = pytest.MonkeyPatch()
    mp.delenv("TFDS_DATA_DIR", raising=False)
    mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    w = tmp_path_factory.mktemp(name) / "w"
    try:
        with mock():
            loop.train_and_evaluate(tiny_config(**config), str(w))
    finally:
        mp.undo()
    return w


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _trained(tmp_path_factory, "run", num_steps=2, lr_boundaries=(1, 2), checkpoint_every_steps=2,
                    eval_every_steps=2)


def _env(cache_home: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "RESFLAX_COMPILATION_CACHE"))
           and k != "TFDS_DATA_DIR"}
    env.update(XDG_CACHE_HOME=str(cache_home), HOME=str(cache_home / "home"), JAX_PLATFORMS="cpu",
               JAX_LOG_COMPILES="1", JAX_EXPLAIN_CACHE_MISSES="1", **extra)
    return env


def _cli(argv: list[str], cache_home: Path, **extra: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-c", CLI, *argv], capture_output=True, text=True,
                       env=_env(cache_home, **extra), cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _eval(w: Path, cache_home: Path, **extra: str) -> subprocess.CompletedProcess:
    return _cli(["eval", "--workdir", str(w), "--json"], cache_home, **extra)


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


def test_predict_is_one_program_loaded_from_the_cache(run_dir, tmp_path):
    """resflax predict runs its forward pass as one compiled program (not one per operation, as an eager
    ``model.apply`` does), so a warm start loads one program from the cache and compiles nothing."""
    from PIL import Image  # noqa: PLC0415

    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    argv = ["predict", "--workdir", str(run_dir), str(image), "--json"]
    cold = _cli(argv, tmp_path)
    warm = _cli(argv, tmp_path)
    assert "PERSISTENT COMPILATION CACHE MISS" not in warm.stderr
    assert warm.stderr.count("Persistent compilation cache hit") == 1, warm.stderr[-3000:]
    assert cold.stdout == warm.stdout


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


def test_no_command_but_a_new_run_initialises_the_network(tmp_path, monkeypatch, capsys):
    """export, import, predict, eval and a resumed train need the network's shapes, not its initial values:
    ``model.init`` runs only traced (``jax.eval_shape``/``jax.jit``), never eagerly (which compiles and runs one
    random draw per weight shape); only a new run's first start initialises."""
    import flax.linen as nn  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    from resflax import cli  # noqa: PLC0415

    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    w = tmp_path / "run"
    with mock():  # a new run: initialised eagerly, as always
        loop.train_and_evaluate(tiny_config(num_steps=2, lr_boundaries=(1, 2), checkpoint_every_steps=2,
                                            eval_every_steps=2, pad_layout="split"), str(w))
    eager = []
    real_init = nn.Module.init

    def init(self, *a, **k):
        if not isinstance(jnp.zeros(()), jax.core.Tracer):
            eager.append(type(self).__name__)
        return real_init(self, *a, **k)

    monkeypatch.setattr(nn.Module, "init", init)
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    f = tmp_path / "r8.safetensors"
    steps = {
        "export": ["export", f"--workdir={w}", f"--out={f}"],
        "import": ["import", str(f), "--config=experiments/cifar10.py:resnet8", f"--workdir={tmp_path / 'imp'}"],
        "predict": ["predict", f"--workdir={tmp_path / 'imp'}", str(image)],
        "eval": ["eval", f"--workdir={w}", "--json"],
    }
    for name, argv in steps.items():
        with mock():
            assert cli.main(argv) == 0, (name, capsys.readouterr().err[-2000:])
        assert not eager, f"resflax {name} initialised {eager} eagerly"
    with mock():  # a resumed run restores its checkpoint into the shapes
        resumed = loop.train_and_evaluate(tiny_config(num_steps=4, lr_boundaries=(1, 2), checkpoint_every_steps=2,
                                                      eval_every_steps=2, pad_layout="split"), str(w))
    assert resumed["step"] == 4 and not eager, f"a resumed train initialised {eager} eagerly"


def test_processes_sharing_the_cache_get_whole_entries(run_dir, tmp_path):
    """Two evals started together on one empty cache folder (both compile and write the same keys), then a
    third: every run exits 0 with the same result, no read or write of the cache fails (JAX raises on one here
    instead of warning), and the third compiles nothing. No temporary file is left."""
    env = _env(tmp_path, JAX_RAISE_PERSISTENT_CACHE_ERRORS="1")
    procs = [subprocess.Popen([sys.executable, "-c", CLI, "eval", "--workdir", str(run_dir), "--json"],
                              stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "persistent compilation cache entry" not in err, err[-3000:]  # JAX's "Error reading/writing ..."
    third = _eval(run_dir, tmp_path, JAX_RAISE_PERSISTENT_CACHE_ERRORS="1")
    assert "PERSISTENT COMPILATION CACHE MISS" not in third.stderr
    results = {out.strip().splitlines()[-1] for out, _ in outs} | {third.stdout.strip().splitlines()[-1]}
    assert len(results) == 1
    cache = tmp_path / "resflax" / "xla"
    assert _entries(cache) and not [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")]


def test_entries_are_written_whole_then_renamed(tmp_path, monkeypatch):
    """JAX's own put writes the entry file in place; resflax's writes a temporary file and renames it."""
    from jax._src import compilation_cache as cc  # noqa: PLC0415

    from resflax import xla  # noqa: PLC0415

    assert xla.atomic_cache_writes()
    renamed = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((Path(a).name, Path(b).name)), real(a, b)))
    cache = cc.LRUCache(str(tmp_path), max_size=-1)
    cache.put("k1", b"x" * 100_000)
    cache.put("k1", b"other")  # a key that is there is never rewritten
    assert cache.get("k1") == b"x" * 100_000
    assert [b for _, b in renamed] == ["k1-cache"] and renamed[0][0].startswith(".tmp-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k1-cache"]


def test_the_cache_folder_is_bounded(tmp_path):
    """Over the bound, the least recently used entries go until half of it is left; a temporary file a killed
    writer left goes once it is stale; other files stay."""
    from resflax import xla  # noqa: PLC0415

    for i in range(10):
        f = tmp_path / f"key{i}-cache"
        f.write_bytes(b"x" * 1000)
        os.utime(f, (1_000_000 + i, 1_000_000 + i))  # key0 used longest ago
    (tmp_path / ".tmp-dead").write_bytes(b"x" * 500)
    os.utime(tmp_path / ".tmp-dead", (1_000_000, 1_000_000))
    (tmp_path / ".tmp-live").write_bytes(b"x" * 500)  # being written now
    (tmp_path / "notes.txt").write_text("mine")
    assert xla.prune_cache(tmp_path, max_bytes=20_000) == 500  # under the bound: only the stale temporary file
    assert len(list(tmp_path.glob("*-cache"))) == 10
    assert xla.prune_cache(tmp_path, max_bytes=8000) == 6000  # 10 kB > 8 kB: down to 4 kB, oldest first
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-live", "key6-cache", "key7-cache", "key8-cache",
                                                           "key9-cache", "notes.txt"]


def _keys(stderr: str, pattern: str) -> set[str]:
    return set(re.findall(pattern + r".*? with key '([^']+)'", stderr))


def test_a_resumed_train_compiles_nothing_and_loads_no_initialisation(tmp_path):
    """A run resumed in a new process loads every program it runs from the cache, and only those of training
    and evaluation: the programs that initialised the network in the first start (one random draw per weight
    shape) are neither compiled nor loaded, since the checkpoint is restored into shapes."""
    w = tmp_path / "w"
    train = ["train", "--config=experiments/cifar10.py:resnet8", "--config.batch_size=16",
             "--config.eval_batch_size=32", "--config.lr_boundaries=(1,2)", "--config.eval_every_steps=2",
             "--config.checkpoint_every_steps=2", "--config.progress=False", f"--workdir={w}"]
    first = _cli([*train, "--config.num_steps=2"], tmp_path)
    resumed = _cli([*train, "--config.num_steps=4"], tmp_path)
    assert "resumed from step 2" in resumed.stdout
    assert "PERSISTENT COMPILATION CACHE MISS" not in resumed.stderr
    written = _keys(first.stderr, "to persistent compilation cache")
    loaded = _keys(resumed.stderr, "Persistent compilation cache hit")
    assert loaded and loaded < written, (len(loaded), len(written))


# `resflax ARGV` in a fresh process without TFDS's mock (which imports TFDS); prints, at exit, which of the
# data libraries (and optax) the command imported
PLAIN = ("import atexit, sys\nfrom resflax import cli\n"
         "atexit.register(lambda: print('imported:', sorted({m.split('.')[0] for m in sys.modules} & "
         "{'tensorflow_datasets', 'grain', 'tensorflow', 'optax'})))\n"
         "sys.exit(cli.main(sys.argv[1:]))\n")


@pytest.fixture(scope="module")
def split_run_dir(tmp_path_factory):
    """A run whose network akamaster's layout can hold (option A's padding split), to export and import."""
    return _trained(tmp_path_factory, "split", num_steps=1, checkpoint_every_steps=1, eval_every_steps=0,
                    pad_layout="split")


def test_readers_of_imported_weights_import_no_data_library(split_run_dir, tmp_path):
    """predict and export of a run whose preprocessing needs no dataset (imported weights: the source's
    per-channel mean) import neither TFDS nor grain (about 0.25 s of every start on 2 cores: resflax.lazy), nor
    optax (0.05 s: they build no optimizer and no loss)."""
    from PIL import Image  # noqa: PLC0415

    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    f, imp = tmp_path / "r8.safetensors", tmp_path / "imp"
    _cli(["export", f"--workdir={split_run_dir}", f"--out={f}"], tmp_path)
    _cli(["import", str(f), "--config=experiments/cifar10.py:resnet8", f"--workdir={imp}"], tmp_path)
    for argv in (["predict", f"--workdir={imp}", str(image)],
                 ["export", f"--workdir={imp}", f"--out={tmp_path / 'again.safetensors'}"]):
        p = subprocess.run([sys.executable, "-c", PLAIN, *argv], capture_output=True, text=True,
                           env=_env(tmp_path), cwd=ROOT, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "imported: []" in p.stdout, (argv[0], p.stdout[-500:])


def test_readers_trace_no_initialisation(split_run_dir, tmp_path, monkeypatch, capsys):
    """eval, predict and export take the variables' tree from the checkpoint itself: ``model.init`` is not even
    traced (``jax.eval_shape`` of it cost ResNet-50's predict 0.3 s), and the network is traced once, for the
    forward pass that checks the variables and that predict compiles."""
    import flax.linen as nn  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    from resflax import cli  # noqa: PLC0415
    from resflax.models import ResNet  # noqa: PLC0415

    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    inits, calls = [], []
    real_init, real_call = nn.Module.init, ResNet.__call__

    def init(self, *a, **k):
        inits.append(type(self).__name__)
        return real_init(self, *a, **k)

    def call(self, *a, **k):
        calls.append(k.get("train"))
        return real_call(self, *a, **k)

    monkeypatch.setattr(nn.Module, "init", init)
    monkeypatch.setattr(ResNet, "__call__", call)
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    w = split_run_dir
    for argv in (["predict", f"--workdir={w}", str(image)], ["eval", f"--workdir={w}"],
                 ["export", f"--workdir={w}", f"--out={tmp_path / 'w.safetensors'}"]):
        calls.clear()
        with mock():
            assert cli.main(argv) == 0, capsys.readouterr().err[-2000:]
        assert not inits and calls[0] is False, (argv[0], inits, calls)
        assert argv[0] == "eval" or calls == [False], (argv[0], calls)  # eval also traces its evaluation step


# the console command (resflax.cli.entry) under TFDS's mock, with an atexit handler that says when the
# interpreter's ordinary teardown ran
QUICK = ("import atexit, sys, tensorflow_datasets as tfds\n"
         "atexit.register(lambda: print('teardown ran', flush=True))\n"
         "from resflax import cli\n"
         "with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):\n"
         "    cli.entry()\n")


def test_predict_ends_as_soon_as_its_output_is_flushed(split_run_dir, tmp_path):
    """``resflax predict`` as a console command ends the process right after flushing what it printed
    (``resflax.cli.entry``: the interpreter's and the libraries' teardown is skipped, so an atexit handler
    does not run): its output through a pipe is the same as ``main``'s with the ordinary exit, and so is its exit
    status, on success and on bad input; other commands (``eval``) end the ordinary way."""
    from PIL import Image  # noqa: PLC0415

    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)

    def quick(argv):
        return subprocess.run([sys.executable, "-c", QUICK, *argv], capture_output=True, text=True,
                              env=_env(tmp_path), cwd=ROOT, timeout=300)

    argv = ["predict", f"--workdir={split_run_dir}", str(image)]
    ordinary = _cli(argv, tmp_path)
    p = quick(argv)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout == ordinary.stdout and len(p.stdout.splitlines()) == 6, p.stdout  # the photo, then 5 classes
    bad = quick(["predict", f"--workdir={tmp_path / 'none'}", str(image)])
    assert bad.returncode == 2 and "teardown ran" not in bad.stdout, (bad.stdout, bad.stderr[-2000:])
    assert bad.stderr.strip().splitlines()[-1].startswith("resflax: "), bad.stderr[-2000:]
    ev = quick(["eval", f"--workdir={split_run_dir}"])
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert ev.stdout.splitlines()[-1] == "teardown ran", ev.stdout
