"""Start-up time of ``resflax eval``, ``resflax predict`` and ``resflax import``: cold (empty compilation cache)
and warm (the same command again), with the persistent compilation cache the CLI turns on
(``resflax.xla.compilation_cache``).

    PYTHONPATH=src python benchmarks/start_time.py [--rounds N] [--models resnet8,resnet50] [--out FILE.md]

Two set-ups, each command in a fresh process, twice (cold, warm), with a fresh ``XDG_CACHE_HOME`` per setting
and round and no ``JAX_COMPILATION_CACHE_DIR``:

* ResNet-8 (CIFAR): a run of 2 steps on TFDS mock data (64 images per split): ``eval`` and ``predict`` of a
  32x32 PNG, under three settings: ``resflax`` (the default: every program written,
  ``CACHE_MIN_COMPILE_SECS``), ``min 1 s`` (``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1``: JAX's own
  threshold), ``off`` (``RESFLAX_COMPILATION_CACHE=0``).
* ResNet-50 (ImageNet, torchvision layout): random weights written as ``.safetensors`` (no PyTorch needed);
  ``import`` of them (the warm start imports into a second folder), ``predict`` of one 400x600 photo
  (scikit-image's ``coffee``), and ``eval`` of the centre 224 crops of the 16 validation images of
  ``resflax make-tiny-imagenet``'s dataset (4 classes, so the weights have a 4-way head; the rest of the
  network is ResNet-50's), under ``resflax`` and ``off``.

Wall time of the whole process (imports included) and its peak RSS (``os.wait4``'s ``ru_maxrss``), the median
over ``--rounds``; ``entries``: the files in the cache folder after the run.
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
# the console command's own function (cli.entry: main, then the exit as `resflax` ends)
MOCK = ("import tensorflow_datasets as tfds\nfrom resflax import cli\n"
        "with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):\n"
        "    cli.entry()\n")
PLAIN = "from resflax import cli\ncli.entry()\n"  # `resflax ARGV`, no mock
TRAIN = ["train", "--config=experiments/cifar10.py:resnet8", "--config.batch_size=16", "--config.eval_batch_size=32",
         "--config.num_steps=2", "--config.lr_boundaries=(1,2)", "--config.eval_every_steps=2",
         "--config.checkpoint_every_steps=2", "--config.progress=False"]
# What every start pays before resflax runs: the interpreter, numpy + ml_dtypes (JAX's dtypes), JAX
FLOOR = {"python -c pass": "pass", "import numpy, ml_dtypes": "import numpy, ml_dtypes", "import jax": "import jax"}
SETTINGS = {"resflax": {}, "min 1 s": {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1"},
            "off": {"RESFLAX_COMPILATION_CACHE": "0"}}


def _env(cache_home: Path, extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "RESFLAX_COMPILATION_CACHE"))
           and k != "TFDS_DATA_DIR"}
    env.update(XDG_CACHE_HOME=str(cache_home), HOME=str(cache_home / "home"), JAX_PLATFORMS="cpu", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return env


def run(argv: list[str], env: dict, mock: bool = True, code: str | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of ``resflax ARGV`` (on TFDS mock data if ``mock``), or of Python running
    ``code``, in a fresh process."""
    t0 = time.perf_counter()
    script = code if code is not None else MOCK if mock else PLAIN
    p = subprocess.Popen([sys.executable, "-c", script, *argv], env=env, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"resflax {' '.join(argv)} exited {p.returncode}:\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def _entries(cache: Path) -> int:
    return sum(1 for p in cache.iterdir() if not p.name.startswith(".")) if cache.is_dir() else 0


def _resnet50_weights(path: Path, num_classes: int) -> None:
    """Random ResNet-50 weights (v1.5, option B, ``num_classes`` outputs) in torchvision's names, as
    ``.safetensors``: the shapes from ``jax.eval_shape`` (nothing compiled), the values from NumPy."""
    import jax  # noqa: PLC0415 (the benchmark's own process: only for the shapes)
    import jax.numpy as jnp  # noqa: PLC0415

    from resflax import weights  # noqa: PLC0415
    from resflax.models import get_model  # noqa: PLC0415

    model = get_model("resnet50", stride_on_3x3=True, shortcut="B", num_classes=num_classes)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), train=False))
    rng = np.random.default_rng(0)
    v = jax.tree_util.tree_map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(np.float32), shapes)
    v["batch_stats"] = jax.tree_util.tree_map(lambda a: np.abs(a) + 1, v["batch_stats"])  # positive variances
    weights.write_state_dict(weights.to_torch(v, model, "torchvision"), path)


def _cifar_setup(tmp: Path) -> dict[str, tuple[list[str], bool]]:
    tmp.mkdir(parents=True)
    work = tmp / "run"
    run([*TRAIN, f"--workdir={work}"], _env(tmp / "train-cache", {}))
    from PIL import Image  # noqa: PLC0415

    image = tmp / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    return {"eval": (["eval", f"--workdir={work}", "--json"], True),
            "predict": (["predict", f"--workdir={work}", str(image)], True)}


def _prepare_resnet50(tmp: Path) -> None:
    """The ResNet-50 set-up's files in ``tmp`` (run in a child process: the benchmark's own process imports no
    JAX, so its memory is not counted in the children's peak RSS): the tiny dataset, random weights with 1000
    and with 4 outputs, the photo."""
    import skimage.data  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    from resflax.data import tiny_imagenet  # noqa: PLC0415

    tiny_imagenet.write_tiny_dataset(str(tmp / "tiny"), num_classes=4, train_per_class=4, val_per_class=4)
    _resnet50_weights(tmp / "r50-1000.safetensors", 1000)
    _resnet50_weights(tmp / "r50-4.safetensors", 4)
    Image.fromarray(skimage.data.coffee()).save(tmp / "coffee.jpg")


def _predict_phases(workdir: str, photo: str) -> None:
    """Where a warm ``resflax predict`` of ``workdir`` spends its time, step by step as ``transfer.predict`` and
    ``evaluate.restore`` take them (run in a child process whose compilation cache is warm); prints one
    ``phase seconds`` line each."""
    t = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        print(f"{name} {now - t[0]:.3f}", flush=True)
        t[0] = now

    import jax  # noqa: PLC0415, F401 (the phases are the point: each import is timed)
    lap("import jax")
    from resflax import xla  # noqa: PLC0415
    xla.configure(training=False)  # as resflax.cli does for predict
    xla.compilation_cache()
    lap("compilation cache on")
    from resflax.train import evaluate, tasks, transfer  # noqa: PLC0415, F401 (transfer: predict's own imports)
    from resflax.train import step as step_lib  # noqa: PLC0415
    from resflax.train.checkpoint import Checkpointer  # noqa: PLC0415
    lap("import resflax's predict (flax, optax, orbax)")
    config = evaluate.load_config(workdir)
    config.num_devices = 0
    run_plan = evaluate.read(config, locate_data=False)
    lap("config, model, mesh")
    ckpt = Checkpointer(workdir, read_only=True)
    host, meta = ckpt.restore_latest(None)
    ckpt.close()
    lap("Orbax read of the variables (NumPy) + digest check")
    v = evaluate.RunVariables(host["step"], *step_lib.replicate((host["params"], host["batch_stats"]),
                                                                run_plan.mesh), meta["state_digest"])
    lap("variables onto the device")
    traced = evaluate.trace_forward(run_plan.model, v, tasks.image_shape(config), workdir)
    lap("trace the forward pass (checks the variables)")
    from resflax.data import imagenet  # noqa: PLC0415
    x = imagenet.eval_crop(Path(photo).read_bytes(), tasks.preprocess(config))[None].astype(np.float32) / 255
    lap("decode and crop the photo")
    lowered = traced.lower()
    lap("lower")
    compiled = lowered.compile()
    lap("compile (a cache hit when warm)")
    np.asarray(compiled({"params": v.params, "batch_stats": v.batch_stats}, x))
    lap("run the forward pass")


def _resnet50_setup(tmp: Path) -> dict[str, tuple[list[str], bool]]:
    tmp.mkdir(parents=True)
    subprocess.run([sys.executable, __file__, "--prepare-resnet50", str(tmp)], env=_env(tmp / "prep", {}), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run(["import", str(tmp / "r50-1000.safetensors"), "--model=resnet50", f"--workdir={tmp / 'r50'}"],
        _env(tmp / "import-cache", {}), mock=False)
    run(["import", str(tmp / "r50-4.safetensors"), "--config=experiments/imagenet.py:resnet50",
         "--config.dataset=resflax_tiny_jpeg", f"--config.data_dir={tmp / 'tiny'}", "--config.eval_batch_size=16",
         "--config.loader_workers=0", f"--workdir={tmp / 'r50-tiny'}"], _env(tmp / "import-cache", {}), mock=False)
    imported = tmp / "imports"
    imported.mkdir()
    n = iter(range(1_000_000))
    # each import writes a new folder: the argument list is rebuilt per start
    return {"import": (lambda: ["import", str(tmp / "r50-1000.safetensors"), "--model=resnet50",
                                f"--workdir={imported / str(next(n))}"], False),
            "predict": (["predict", f"--workdir={tmp / 'r50'}", str(tmp / "coffee.jpg")], False),
            "eval": (["eval", f"--workdir={tmp / 'r50-tiny'}", "--json"], False)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1, help="cold/warm pairs per command and setting (median shown)")
    ap.add_argument("--models", default="resnet8,resnet50", help="the set-ups to run (comma-separated)")
    ap.add_argument("--out", help="also write the markdown table here")
    ap.add_argument("--prepare-resnet50", help=argparse.SUPPRESS)  # internal: _resnet50_setup's child process
    ap.add_argument("--predict-phases", nargs=2, help=argparse.SUPPRESS)  # internal: WORKDIR PHOTO
    args = ap.parse_args()
    if args.prepare_resnet50:
        _prepare_resnet50(Path(args.prepare_resnet50))
        return 0
    if args.predict_phases:
        _predict_phases(*args.predict_phases)
        return 0
    with tempfile.TemporaryDirectory(prefix="resflax-start-") as tmp:
        tmp = Path(tmp)
        models = args.models.split(",")
        setups = []
        if "resnet8" in models:
            setups.append(("resnet8", _cifar_setup(tmp / "cifar"), SETTINGS))
        if "resnet50" in models:
            setups.append(("resnet50", _resnet50_setup(tmp / "r50"),
                           {k: v for k, v in SETTINGS.items() if k != "min 1 s"}))
        cases = [(model, name, argv, mock, setting, extra) for model, commands, settings in setups
                 for name, (argv, mock) in commands.items() for setting, extra in settings.items()]
        got: dict[tuple, list] = {}
        phases: dict[str, list[float]] = {}
        for r in range(args.rounds):  # rounds outermost: the machine's load falls on every case alike
            for name, code in FLOOR.items():
                wall, rss = run([], _env(tmp / "floor", {}), code=code)
                got.setdefault(("-", name, "-", "-"), []).append((wall, rss, 0))
                print(f"{name}: {wall:6.2f} s  {rss:7.0f} MiB", flush=True)
            for model, name, argv, mock, setting, extra in cases:
                home = tmp / "homes" / f"{model}-{name}-{setting.replace(' ', '')}-{r}"
                env = _env(home, extra)
                for start in ("cold", "warm"):
                    wall, rss = run(argv() if callable(argv) else argv, env, mock)
                    got.setdefault((model, name, setting, start), []).append(
                        (wall, rss, _entries(home / "resflax" / "xla")))
                    print(f"{model:8s} {name:8s} {setting:8s} {start} {r}: {wall:6.2f} s  {rss:7.0f} MiB  "
                          f"{got[model, name, setting, start][-1][-1]} entries", flush=True)
            if "resnet50" in models:  # where the warm predict's time goes, in the cache the last start filled
                home = tmp / "homes" / f"resnet50-predict-resflax-{r}"
                p = subprocess.run([sys.executable, __file__, "--predict-phases", str(tmp / "r50" / "r50"),
                                    str(tmp / "r50" / "coffee.jpg")], env=_env(home, {}), capture_output=True,
                                   text=True, check=True)
                for line in p.stdout.splitlines():
                    name, secs = line.rsplit(" ", 1)
                    phases.setdefault(name, []).append(float(secs))
        rows = [(*key, *(float(np.median(c)) for c in zip(*vals, strict=True))) for key, vals in got.items()]
    lines = [f"Machine: {_cpu()}, {os.cpu_count()} cores, "
             f"Python {platform.python_version()}, jax {_version('jax')}, jaxlib {_version('jaxlib')}; "
             f"median of {args.rounds} round(s).", "",
             "| model | command | cache | start | wall (s) | peak RSS (MiB) | cache entries after |",
             "|---|---|---|---|---:|---:|---:|"]
    lines += [f"| {m} | {n} | {s} | {st} | {w:.2f} | {r:.0f} | {e:.0f} |" for m, n, s, st, w, r, e in rows]
    if phases:
        lines += ["", "Warm `resflax predict` of the ResNet-50 run, phase by phase (in one process, as "
                  "`transfer.predict` takes them):", "", "| phase | s |", "|---|---:|"]
        lines += [f"| {name} | {np.median(v):.2f} |" for name, v in phases.items()]
        lines.append(f"| sum | {sum(np.median(v) for v in phases.values()):.2f} |")
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
