"""Workdir hygiene: one run at a time (an flock that dies with its process), the experiment's identity,
and metrics files (``metrics.jsonl`` and TensorBoard events) written by process 0 only."""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from resflax.configs import ADDED_KEYS, RESUMABLE_KEYS
from resflax.errors import WorkdirError, WriteError
from resflax.train import tbevents

# The experiment's identity, from the config keys' definition (resflax.configs.KEYS; importable from here
# too): RESUMABLE_KEYS may change between a run and its resumption without making it another experiment; a
# config.json without one of ADDED_KEYS (keys added after runs were made) means that key's value there.


class Lock:
    """An exclusive ``flock`` on ``WORKDIR/.lock``; the kernel drops it when the process dies (even kill -9)."""

    def __init__(self, workdir: Path):
        self.path = workdir / ".lock"
        self.fd = None

    def acquire(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Path(self.path).read_text().strip() or "another process"
            os.close(self.fd)
            self.fd = None
            raise WorkdirError(f"workdir {self.path.parent} is in use by {holder}") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def prepare(workdir: str | Path) -> Path:
    """Creates the workdir (or checks it is writable); raises ``WorkdirError`` otherwise."""
    path = Path(workdir).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot create workdir {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise WorkdirError(f"workdir {path} is not writable")
    return path


def write_json_atomic(path: Path, obj: Any) -> None:
    """Writes ``obj`` as JSON via a temporary file and a rename: a kill leaves the old file or the new one.
    A failure raises ``WriteError`` naming the file (the old file, if any, is untouched)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from e


def _parse(line: str) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except ValueError:  # a line torn by a kill mid-write
        return None
    return rec if isinstance(rec, dict) else None


def identity(config: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in config.items() if k not in RESUMABLE_KEYS}
    for k, default in ADDED_KEYS.items():
        if out.get(k, default) == default:
            out.pop(k, None)
    return out


def population_members(path: str | Path) -> list[Path] | None:
    """The member run directories of a population's workdir (``members/*`` in its ``population.json``
    order), or None when ``path`` is not a population's."""
    f = Path(path) / "population.json"
    if not f.exists():
        return None
    try:
        members = json.loads(f.read_text())["members"]
    except (ValueError, KeyError, TypeError):
        raise WorkdirError(f"{f} is damaged (not the population's JSON)") from None
    return [Path(path) / m["dir"] for m in members]


def check_experiment(workdir: Path, config: dict[str, Any]) -> None:
    """Refuses a workdir whose ``config.json`` describes a different experiment."""
    f = workdir / "config.json"
    if not f.exists():
        return
    try:
        old = json.loads(f.read_text())
    except ValueError:
        raise WorkdirError(f"{f} is not valid JSON; move it away or pass --start_over") from None
    a, b = identity(old), identity(json.loads(json.dumps(config)))
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:4])
        raise WorkdirError(
            f"workdir {workdir} holds a different experiment ({shown}); use another --workdir, "
            "or pass --start_over to move the old run aside"
        )


def resumable_changes(workdir: Path, config: dict[str, Any]) -> dict[str, list[Any]]:
    """``{key: [old, new]}`` for the resumable settings that differ from the workdir's ``config.json``."""
    f = workdir / "config.json"
    if not f.exists():
        return {}
    old, new = json.loads(f.read_text()), json.loads(json.dumps(config))
    return {k: [old.get(k), new.get(k)] for k in sorted(RESUMABLE_KEYS) if old.get(k) != new.get(k)}


def set_aside(workdir: Path) -> Path | None:
    """Moves an existing run out of the way (``WORKDIR.old-<time>``), for ``--start_over``; loses nothing."""
    if not workdir.exists() or not any(workdir.iterdir()):
        return None
    dst = workdir.with_name(f"{workdir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    workdir.rename(dst)
    workdir.mkdir()
    return dst


class _TensorBoard:
    """TensorBoard scalars, written synchronously (``tbevents``: no writer thread, so a failed write raises
    here instead of silently killing a thread and then blocking its queue)."""

    def __init__(self, logdir: Path, purge_step: int | None):
        self.logdir = logdir
        self.file = tbevents.EventFile(logdir)
        if purge_step:  # TensorBoard hides the events of this dir's earlier starts from this step on
            self.file.write(tbevents.event(time.time(), purge_step, session_start=True))

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.file.write(tbevents.event(time.time(), step, scalars=values))

    def close(self) -> None:
        self.file.close()


class MetricsWriter:
    """Appends JSON lines to ``metrics.jsonl`` and scalars to TensorBoard (``WORKDIR/tb``); a failed write
    raises ``WriteError`` naming the file."""

    def __init__(self, workdir: Path, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        try:
            if self.path.exists():
                # Drop lines written after the checkpoint we resume from (they will be written again,
                # identically) and lines torn by a kill mid-write.
                keep = [ln for ln in self.path.read_text().splitlines()
                        if (r := _parse(ln)) is not None and r.get("step", 0) <= resume_step]
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text("".join(k + "\n" for k in keep))
                tmp.replace(self.path)
        except OSError as e:
            raise WriteError(f"cannot write {self.path}: {e.strerror or e}") from e
        try:
            self.tb = _TensorBoard(workdir / "tb", resume_step + 1 if resume_step else None)
        except OSError as e:
            raise WriteError(f"cannot write TensorBoard events in {workdir / 'tb'}: {e.strerror or e}") from e

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise WriteError(f"cannot write {self.path}: {e.strerror or e}") from e
        split = record.get("split")
        values = {f"{split}/{k}": v for k, v in record.items()
                  if split and k not in ("step", "split", "event") and isinstance(v, int | float)}
        if values:
            try:
                self.tb.scalars(values, record["step"])
            except OSError as e:
                raise WriteError(f"cannot write TensorBoard events in {self.tb.logdir}: {e.strerror or e}") from e

    def close(self) -> None:
        if self.tb is not None:
            try:
                self.tb.close()
            except OSError:
                pass  # every event was flushed when written
