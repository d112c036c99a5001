"""Cost of agreeing on a stop step across processes (``preemption_check_every_steps``), measured.

Runs the same short training as 2 CPU processes (1 device each, gloo) with the check every 1, 10 and
1,000,000 steps (the last: never, the reference), interleaved over ``--rounds``, and reports the median
training img/s of each relative to the reference, from the runs' ``metrics.jsonl``.

    TFDS_DATA_DIR=../shared/tfds python benchmarks/preemption_check.py --steps 300 --rounds 3 --json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(every: int, steps: int, model: str, batch: int, workdir: Path) -> float:
    port, procs = _port(), []
    for i in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                   RESFLAX_COORDINATOR=f"127.0.0.1:{port}", RESFLAX_NUM_PROCESSES="2", RESFLAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "resflax.cli", "train", f"--config=experiments/cifar10.py:{model}",
             f"--workdir={workdir}", f"--config.num_steps={steps}", f"--config.batch_size={batch}",
             "--config.log_every_steps=50", f"--config.eval_every_steps={10 * steps}", "--config.progress=False",
             f"--config.checkpoint_every_steps={10 * steps}", f"--config.preemption_check_every_steps={every}"],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    if [p.wait(timeout=1800) for p in procs] != [0, 0]:
        raise SystemExit(f"a run with check every {every} failed")
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    ips = [r["img_per_s"] for r in rows if r.get("split") == "train"][1:]  # the first interval compiles
    return statistics.median(ips)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="resnet8")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    settings = (1_000_000, 1, 10)
    got: dict[int, list[float]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for s in settings:
                got[s].append(run(s, args.steps, args.model, args.batch, Path(tmp) / f"r{r}-{s}"))
    ref = statistics.median(got[1_000_000])
    out = {"model": args.model, "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
           "reference_img_per_s": round(ref, 1),
           **{f"every_{s}_ratio": round(statistics.median(got[s]) / ref, 3) for s in settings if s != 1_000_000}}
    print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
