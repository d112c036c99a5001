"""Helpers for the subprocess tests (kill -9, signals, multi-process): run ``tests/train_driver.py`` on mock
data with 2 CPU devices (or 2 processes of 1), watch its progress, and the digest of an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "train_driver.py"
NUM_STEPS = 24

# Every subprocess run of these tests: resnet8, batch 16 on 64 mock images (4 steps per epoch).
BASE_ARGS = [
    "--config=experiments/cifar10.py:resnet8", "--config.batch_size=16", "--config.eval_batch_size=32",
    f"--config.num_steps={NUM_STEPS}", "--config.lr_boundaries=(12,18)", "--config.log_every_steps=1",
    "--config.eval_every_steps=8", "--config.progress=False",
]
_cache: dict = {}


def cache_dir(tmp_path_factory) -> Path:
    """One persistent XLA compilation cache for the session: later subprocesses skip most compiling. The one
    conftest.py made for the in-process tests where there is one (their eager initialisations are the same
    programs)."""
    if "cc" not in _cache:
        shared = os.environ.get("JAX_COMPILATION_CACHE_DIR")
        _cache["cc"] = Path(shared) if shared else tmp_path_factory.mktemp("xla_cache")
    return _cache["cc"]


def env(cc: Path, devices: int = 2, **extra) -> dict:
    e = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_COMPILATION_CACHE_DIR=str(cc), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", PYTHONUNBUFFERED="1")
    e.update({k: str(v) for k, v in extra.items()})
    return e


def start(workdir: Path, log: Path, e: dict, *extra: str) -> subprocess.Popen:
    f = open(log, "a")  # noqa: SIM115 (closed with the process by the caller's wait)
    return subprocess.Popen([sys.executable, str(DRIVER), *BASE_ARGS, *extra, f"--workdir={workdir}"],
                            stdout=f, stderr=subprocess.STDOUT, env=e, cwd=ROOT)


def run(workdir: Path, log: Path, e: dict, *extra: str, timeout: float = 300) -> int:
    return start(workdir, log, e, *extra).wait(timeout=timeout)


def train_step(workdir: Path) -> int:
    """The highest training step recorded in ``metrics.jsonl`` so far (0 if none)."""
    f = Path(workdir) / "metrics.jsonl"
    best = 0
    if f.exists():
        for line in f.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("split") == "train":
                best = max(best, r["step"])
    return best


def wait_for_step(proc: subprocess.Popen, workdir: Path, step: int, timeout: float = 180) -> int:
    """Polls until training passed ``step`` (returns it) or the process ended (returns -1)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        s = train_step(workdir)
        if s >= step:
            return s
        if proc.poll() is not None:
            return -1
        time.sleep(0.02)
    raise TimeoutError(f"no training step {step} in {workdir} after {timeout}s")


def kill9(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def digest(log: Path) -> str | None:
    """The 16-hex-digit state_digest prefix of the last ``final test error`` line of a log."""
    m = re.findall(r"final test error: .* state_digest ([0-9a-f]{16})\)", Path(log).read_text())
    return m[-1] if m else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference(tmp_path_factory) -> tuple[str, Path]:
    """(digest, workdir) of an uninterrupted run: 1 process, 2 devices; computed once per session."""
    if "ref" not in _cache:
        cc = cache_dir(tmp_path_factory)
        w = tmp_path_factory.mktemp("reference")
        rc = run(w / "run", w / "log", env(cc), "--config.checkpoint_every_steps=1000")
        d = digest(w / "log")
        assert rc == 0 and d, (w / "log").read_text()[-2000:]
        _cache["ref"] = (d, w / "run")
    return _cache["ref"]


def metrics(workdir: Path) -> list[dict]:
    """metrics.jsonl without the per-start ``data`` events and the timing field."""
    rows = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows if r.get("event") not in ("data", "config")]
