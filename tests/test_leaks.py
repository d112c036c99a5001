"""Nothing of a run outlives it (issue 23): ``kill -9`` of an ImageNet-style run takes its grain loader
workers and their shared memory (``/dev/shm``) with it within seconds, and a run with loader workers ends
without the resource tracker's "leaked shared_memory objects" warning.

Linux only (``/proc``, ``/dev/shm``). Other processes (other tests) may use ``/dev/shm`` at the same time, so
an entry counts as left behind when it was not there before the run and, seconds after the run ended, no
live process maps it or holds it open."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import run_helpers as rh

ROOT = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not (Path("/proc/self/task").is_dir() and SHM.is_dir()),
                                reason="needs Linux's /proc and /dev/shm")


def _command(data: Path, tmp: Path, *extra: str) -> list[str]:
    """A ``:tiny`` run with 2 loader workers."""
    args = ["--config=experiments/imagenet.py:tiny", f"--config.data_dir={data}", f"--config.mean_cache_dir={tmp}/c",
            "--config.loader_workers=2", "--config.log_every_steps=1", "--config.progress=False", *extra]
    return [sys.executable, "-m", "resflax.cli", "train", *args, f"--workdir={tmp}/run"]


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first), or None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` -> its start time (tells a process from a later one with the same pid)."""
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            for c in kids:
                if c not in out and (st := _stat(c)) is not None:
                    out[c] = st[19]
                    todo.append(c)
    return out


def _alive(procs: dict[int, str]) -> list[int]:
    """Those still running (a zombie has ended: it only waits to be reaped)."""
    return [p for p, start in procs.items() if (st := _stat(p)) is not None and st[19] == start and st[0] != "Z"]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _held() -> set[str]:
    """The /dev/shm names that some live process maps or holds open."""
    names = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for line in (proc / "maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    names.add(line.split("/dev/shm/", 1)[1].removesuffix(" (deleted)"))
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("/dev/shm/"):
                    names.add(target.removeprefix("/dev/shm/"))
        except OSError:
            continue
    return names


def _left_behind(before: set[str]) -> set[str]:
    new = {p.name for p in SHM.iterdir()} - before
    return new - _held() if new else new


@pytest.mark.slow
def test_kill_9_takes_the_loader_workers_and_their_shared_memory(tiny_data, tmp_path, tmp_path_factory):
    before = {p.name for p in SHM.iterdir()}
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(_command(tiny_data, tmp_path, "--config.num_steps=1000"), stdout=log,
                                stderr=subprocess.STDOUT, env=rh.env(rh.cache_dir(tmp_path_factory)), cwd=ROOT)
    try:
        assert rh.wait_for_step(proc, tmp_path / "run", 3, timeout=300) >= 3, (tmp_path / "log").read_text()[-3000:]
        procs = _descendants(proc.pid)
        workers = [p for p in procs if "spawn_main" in _cmdline(p)]
        assert len(workers) >= 2, {p: _cmdline(p) for p in procs}
        assert {p.name for p in SHM.iterdir()} - before, "the run's loader uses no shared memory?"
    finally:
        rh.kill9(proc)
    t0 = time.time()
    while (_alive(procs) or _left_behind(before)) and time.time() - t0 < 10:
        time.sleep(0.2)
    alive, left = {p: _cmdline(p)[:120] for p in _alive(procs)}, _left_behind(before)
    _end(procs)
    assert not alive, f"still running 10 s after kill -9: {alive}"
    assert not left, f"left in /dev/shm 10 s after kill -9: {sorted(left)[:10]} ({len(left)} in all)"


def _end(procs: dict[int, str]) -> None:
    """Ends what this test's run left running: its workers first, so that the resource tracker (which ends
    once nothing holds its pipe) unlinks their shared memory; the tracker itself if it is still there."""
    for p in _alive(procs):
        if "resource_tracker" not in _cmdline(p):
            os.kill(p, signal.SIGKILL)
    t0 = time.time()
    while _alive(procs) and time.time() - t0 < 10:
        time.sleep(0.2)
    for p in _alive(procs):
        os.kill(p, signal.SIGKILL)


@pytest.mark.slow
def test_a_run_with_loader_workers_ends_without_leaked_shared_memory(tiny_data, tmp_path, tmp_path_factory):
    before = {p.name for p in SHM.iterdir()}
    # stdout through a pipe, read to its end: that is when every process holding it ended, the resource
    # tracker included, which reports leaks after the run itself exited
    r = subprocess.run(_command(tiny_data, tmp_path, "--config.num_steps=4", "--config.eval_every_steps=2",
                                "--config.lr_boundaries=(2,3)"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       env=rh.env(rh.cache_dir(tmp_path_factory)), cwd=ROOT, timeout=600, text=True)
    log = r.stdout
    assert r.returncode == 0 and "final test error" in log, log[-3000:]
    assert "leaked" not in log, log[-3000:]
    t0 = time.time()
    while (left := _left_behind(before)) and time.time() - t0 < 10:
        time.sleep(0.2)
    assert not left, sorted(left)[:10]
