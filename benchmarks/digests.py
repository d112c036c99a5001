"""The documented state digests of this checkout, each from a fresh run in its own process (CPU JAX).

    python benchmarks/digests.py [--demo] [--out DIR]

- ``mock``: ``tests/train_driver.py`` with the subprocess tests' settings (resnet8, 24 steps, 2 CPU devices, TFDS
  mock data): the "mock run" digest.
- ``tiny``: ``experiments/imagenet.py:tiny`` on the small real-photo dataset ``resflax make-tiny-imagenet`` writes.
- ``population``: plain8/resnet8 x seeds 0, 1 as one population (mock data), and each member's single run: every
  member's digest must equal its single run's.
- ``demo`` (with ``--demo``; needs CIFAR-10, ~7 min on 2 cores): ``make demo``'s run.

Used to check that a restructuring leaves every result bit-identical: run it before and after on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import run_helpers as rh  # noqa: E402


def _digest(text: str) -> str | None:
    m = re.findall(r"final test error: .* state_digest ([0-9a-f]{16})\)", text)
    return m[-1] if m else None


def _run(cmd: list[str], env: dict, log: Path) -> str:
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    text = log.read_text()
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {rc}:\n{text[-3000:]}")
    return text


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", action="store_true", help="also make demo's run (needs CIFAR-10, ~7 min)")
    ap.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="resflax-digests-"))
    out.mkdir(parents=True, exist_ok=True)
    cc = out / "xla_cache"
    env = rh.env(cc)
    res: dict[str, str | None] = {}

    res["mock"] = _digest(_run([sys.executable, str(rh.DRIVER), *rh.BASE_ARGS, f"--workdir={out / 'mock'}"],
                               env, out / "mock.log"))

    one = rh.env(cc, devices=1)
    cli = [sys.executable, "-m", "resflax.cli"]
    if not (out / "tinydata" / "resflax_tiny_jpeg").exists():
        _run([*cli, "make-tiny-imagenet", "--out", str(out / "tinydata")], one, out / "tinydata.log")
    res["tiny"] = _digest(_run([*cli, "train", "--config=experiments/imagenet.py:tiny",
                                f"--config.data_dir={out / 'tinydata'}", f"--config.mean_cache_dir={out / 'cache'}",
                                "--config.progress=False", f"--workdir={out / 'tiny'}"], one, out / "tiny.log"))

    _run([sys.executable, str(rh.DRIVER), *rh.BASE_ARGS, "--config.population.seeds=0,1",
          "--config.population.residual=0,1", f"--workdir={out / 'pop'}"], env, out / "pop.log")
    status = json.loads((out / "pop" / "population.json").read_text())
    for m in status["members"]:
        meta = sorted((out / "pop" / m["dir"] / "checkpoints").iterdir(), key=lambda p: int(p.name))[-1]
        member = json.loads((meta / "meta" / "metadata").read_text())["state_digest"][:16]
        model, seed = m["model"], m["seed"]
        single = _digest(_run([sys.executable, str(rh.DRIVER), *rh.BASE_ARGS, f"--config.model={model}",
                               f"--config.seed={seed}", f"--workdir={out / ('single-' + m['name'])}"],
                              env, out / f"single-{m['name']}.log"))
        res[f"population {m['name']}"] = member
        res[f"single {m['name']}"] = single

    if a.demo:
        text = _run([*cli, "train", "--config=experiments/cifar10.py:runlocal", "--config.progress=False",
                     f"--workdir={out / 'demo'}"], dict(os.environ), out / "demo.log")
        res["demo"] = _digest(text)
        m = re.findall(r"final test error: ([0-9.]+%)", text)
        res["demo test error"] = m[-1] if m else None

    for k, v in res.items():
        print(f"{k:28s} {v}")
    pop_ok = all(res[k] == res["single" + k[len("population"):]] for k in res if k.startswith("population"))
    print("population members equal their single runs:", pop_ok)
    return 0 if pop_ok else 1


if __name__ == "__main__":
    sys.exit(main())
