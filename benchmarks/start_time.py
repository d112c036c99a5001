"""Start-up time of ``resflax eval`` and ``resflax predict``: cold (empty compilation cache) and warm (the same
command again), with the persistent compilation cache the CLI turns on (``resflax.xla.compilation_cache``).

    PYTHONPATH=src python benchmarks/start_time.py [--out FILE.md]

A ResNet-8 run of 2 steps on TFDS mock data (64 images per split) is trained once; then each command runs in a
fresh process, twice, with a fresh ``XDG_CACHE_HOME`` per setting and no ``JAX_COMPILATION_CACHE_DIR``:

* ``resflax`` (the default: every program written, ``CACHE_MIN_COMPILE_SECS``),
* ``min 1 s`` (``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1``: JAX's own threshold),
* ``off`` (``RESFLAX_COMPILATION_CACHE=0``).

Wall time of the whole process (imports included) and its peak RSS (``os.wait4``'s ``ru_maxrss``); ``entries``:
the files in the cache folder after the run.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MOCK = ("import sys, tensorflow_datasets as tfds\nfrom resflax import cli\n"
        "with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):\n"
        "    sys.exit(cli.main(sys.argv[1:]))\n")
TRAIN = ["train", "--config=experiments/cifar10.py:resnet8", "--config.batch_size=16", "--config.eval_batch_size=32",
         "--config.num_steps=2", "--config.lr_boundaries=(1,2)", "--config.eval_every_steps=2",
         "--config.checkpoint_every_steps=2", "--config.progress=False"]
SETTINGS = {"resflax": {}, "min 1 s": {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1"},
            "off": {"RESFLAX_COMPILATION_CACHE": "0"}}


def _env(cache_home: Path, extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "RESFLAX_COMPILATION_CACHE"))
           and k != "TFDS_DATA_DIR"}
    env.update(XDG_CACHE_HOME=str(cache_home), HOME=str(cache_home / "home"), JAX_PLATFORMS="cpu", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return env


def run(argv: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of ``resflax ARGV`` on mock data in a fresh process."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", MOCK, *argv], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"resflax {' '.join(argv)} exited {p.returncode}:\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def _entries(cache: Path) -> int:
    return sum(1 for p in cache.iterdir() if not p.name.startswith(".")) if cache.is_dir() else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the markdown table here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="resflax-start-") as tmp:
        tmp = Path(tmp)
        work = tmp / "run"
        run([*TRAIN, f"--workdir={work}"], _env(tmp / "train-cache", {}))
        from PIL import Image  # noqa: PLC0415

        image = tmp / "img.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
        commands = {"eval": ["eval", f"--workdir={work}", "--json"],
                    "predict": ["predict", f"--workdir={work}", str(image)]}
        rows = []
        for name, argv in commands.items():
            for setting, extra in SETTINGS.items():
                home = tmp / f"{name}-{setting.replace(' ', '')}"
                env = _env(home, extra)
                for start in ("cold", "warm"):
                    wall, rss = run(argv, env)
                    rows.append((name, setting, start, wall, rss, _entries(home / "resflax" / "xla")))
                    print(f"{name:8s} {setting:8s} {start}: {wall:6.2f} s  {rss:7.0f} MiB  "
                          f"{rows[-1][-1]} entries", flush=True)
    lines = [f"Machine: {_cpu()}, {os.cpu_count()} cores, "
             f"Python {platform.python_version()}, jax {_version('jax')}, jaxlib {_version('jaxlib')}.", "",
             "| command | cache | start | wall (s) | peak RSS (MiB) | cache entries after |",
             "|---|---|---|---:|---:|---:|"]
    lines += [f"| {n} | {s} | {st} | {w:.2f} | {r:.0f} | {e} |" for n, s, st, w, r, e in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def _version(pkg: str) -> str:
    from importlib.metadata import version  # noqa: PLC0415

    return version(pkg)


if __name__ == "__main__":
    sys.exit(main())
