"""Orbax checkpoints of the train state, resilient to kills and damage.

Layout: ``WORKDIR/checkpoints/<step>/{state,meta}``; ``state`` is the TrainState pytree
(``StandardSave``), ``meta`` a JSON dict (config, digest, ...). Orbax writes each step into a temporary
directory and renames it when complete, so a kill mid-save leaves no half checkpoint among the steps.

Restoring classifies what goes wrong, because the two kinds of failure need opposite actions:

- **Damage**: the checkpoint's own bytes fail: unreadable or invalid metadata, an item missing, files that
  do not decode (truncated, corrupted), or contents that differ from the digest of every leaf written in
  ``meta``. A training run moves a damaged checkpoint to ``WORKDIR/checkpoints_damaged/`` (never deleted)
  with a one-line warning and tries the previous one; when every checkpoint is damaged the run starts from
  step 0 (training is deterministic, so it reproduces the same states). A read-only reader (``eval``,
  ``responses``) skips it, says so, and leaves it where it is.
- **Anything else** raises ``RestoreError`` and leaves every checkpoint where it was: a state tree that no
  longer matches the checkpoint's (parameter names or shapes changed by an upgrade or a config), an
  allocation failure, a device error, an I/O error (``EIO``, permissions, an unavailable file system), or a
  failure this module cannot attribute to the bytes.

A save that fails (disk full, not writable) raises ``CheckpointError`` naming the step; Orbax's temporary
directory is never taken for a checkpoint, so the previous checkpoint stays the latest valid one, and stale
temporary directories are removed on the next training start. Checkpoints are tensorstore arrays and JSON:
nothing is ever unpickled.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from resflax import interrupts
from resflax.errors import CheckpointError, RestoreError
from resflax.quiet import quiet_absl
from resflax.train import distributed
from resflax.train.state import tree_digest

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "Checkpointer", "Damaged", "RestoreError", "classify_restore_error"]


# What a reader of a run needs of its state: the network's variables (``Checkpointer.restore_latest(None)``)
VARIABLES = ("params", "batch_stats")


class Damaged(Exception):
    """The bytes of one checkpoint are bad (internal: the caller sets it aside or skips it)."""


# Tensorstore reports errors as ``ValueError("<STATUS>: ...")``. These statuses speak of the bytes read;
# the others (UNAVAILABLE, PERMISSION_DENIED, RESOURCE_EXHAUSTED, ...) of the machine.
_DAMAGE_STATUSES = ("DATA_LOSS", "FAILED_PRECONDITION", "OUT_OF_RANGE", "NOT_FOUND")
_ENVIRONMENT_ERRNOS = {errno.EIO, errno.EACCES, errno.EPERM, errno.ENOMEM, errno.ENOSPC, errno.EMFILE,
                       errno.ENFILE, errno.ETIMEDOUT, errno.EAGAIN, errno.EROFS, errno.EBUSY, errno.ESTALE}
_ALLOCATION_WORDS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def classify_restore_error(err: BaseException) -> str:
    """``"damage"`` when ``err`` (from reading one checkpoint) shows bad bytes; else what it shows instead:
    ``"allocation"``, ``"device"``, ``"io"`` or ``"unknown"`` (all of which leave the checkpoint alone)."""
    chain = list(_chain(err))
    for e in chain:  # the machine first: a bad read caused by the machine is not the checkpoint's fault
        text = str(e)
        if isinstance(e, MemoryError) or any(w in text for w in _ALLOCATION_WORDS):
            return "allocation"
        if isinstance(e, jax.errors.JaxRuntimeError):
            return "device"
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and (
                e.errno in _ENVIRONMENT_ERRNOS or e.errno is None):
            return "io"
        if text.startswith(("UNAVAILABLE", "PERMISSION_DENIED", "DEADLINE_EXCEEDED", "UNAUTHENTICATED",
                            "ABORTED", "CANCELLED")):
            return "io"
    for e in chain:
        if isinstance(e, Damaged | json.JSONDecodeError | FileNotFoundError | UnicodeDecodeError):
            return "damage"
        if isinstance(e, ValueError) and str(e).startswith(_DAMAGE_STATUSES):
            return "damage"
        if isinstance(e, KeyError) and "not found in the checkpoint" in str(e):
            return "damage"
    return "unknown"


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _key(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _tree_paths(tree: Any) -> set[tuple[str, ...]]:
    return {tuple(_key(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _stored_paths(step_dir: Path) -> set[tuple[str, ...]]:
    """Paths of the arrays a checkpoint holds, from its own metadata; ``Damaged`` if that is unreadable. (The
    metadata's shapes are per-process write shapes, not global ones: a shape change is left to Orbax, whose
    error is not damage either.)"""
    meta_file = step_dir / "state" / "_METADATA"
    try:
        tree = json.loads(meta_file.read_text())["tree_metadata"]
        return {tuple(str(k["key"]) for k in entry["key_metadata"]) for entry in tree.values()
                if not (entry["value_metadata"].get("skip_deserialize")
                        or entry["value_metadata"].get("value_type") == "None")}
    except FileNotFoundError:
        raise Damaged(f"no {meta_file.relative_to(step_dir)}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise Damaged(f"unreadable {meta_file.relative_to(step_dir)} ({_first_line(e)})") from None


def _read_meta(step_dir: Path) -> Any:
    """A checkpoint's ``meta`` item; ``Damaged`` if it is missing or not JSON (other OSErrors are the machine's:
    classified by the caller)."""
    try:
        return json.loads((step_dir / "meta" / "metadata").read_text())
    except (FileNotFoundError, ValueError) as e:
        raise Damaged(f"unreadable meta/metadata ({_first_line(e)})") from None


def check_tree(step: int, step_dir: Path, abstract_state: Any) -> None:
    """Raises ``RestoreError`` when the checkpoint's arrays are not the ones ``abstract_state`` expects."""
    want, have = _tree_paths(abstract_state), _stored_paths(step_dir)
    missing, extra = sorted(want - have), sorted(have - want)
    if not (missing or extra):
        return
    parts = [f"{len(keys)} {what} (e.g. {'/'.join(keys[0])})"
             for what, keys in (("missing", missing), ("unexpected", extra)) if keys]
    raise RestoreError(
        f"checkpoint {step} holds another state tree than this code builds: {', '.join(parts)}; it was "
        "written by another version of resflax or another model, and was left where it is")


class Checkpointer:
    """The checkpoints of one workdir. ``read_only=True`` never creates, moves or deletes anything."""

    def __init__(self, workdir: str | Path, keep: int = 3, read_only: bool = False):
        self.dir = Path(workdir).absolute() / "checkpoints"
        self.damaged_dir = Path(workdir).absolute() / "checkpoints_damaged"
        self.read_only = read_only
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                                   cleanup_tmp_directories=False)
            # Orbax warns that a read-only directory is read-only: noise on stderr for every eval
            with quiet_absl():
                self.manager = ocp.CheckpointManager(self.dir, options=options, item_names=("state", "meta"))
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
            self.manager = ocp.CheckpointManager(self.dir, options=options, item_names=("state", "meta"))
        self._started = 0  # the step of the latest save started (an asynchronous failure belongs to it)
        self.skipped: list[int] = []  # damaged checkpoints a read-only reader passed over

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, host_state: Any = None) -> None:
        """Starts an (asynchronous) save of ``state`` at ``step``; a failure raises ``CheckpointError`` here or
        from the next ``save``/``wait``. ``meta`` gets a digest of every leaf, checked on restore."""
        if self.read_only:
            raise RuntimeError("a read-only Checkpointer cannot save")
        host_state = distributed.to_host(state) if host_state is None else host_state
        meta = {**meta, "tree_digest": tree_digest(host_state)}
        try:
            self.manager.save(
                int(step),
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True,
            )
        except Exception as e:  # noqa: BLE001 (also a failure of the previous, asynchronous save)
            raise self._save_error(step, e) from e
        self._started = int(step)

    def _save_error(self, step: int, err: BaseException) -> CheckpointError:
        try:
            latest = [s for s in self.steps() if s < step]
        except Exception:  # noqa: BLE001
            latest = []
        kept = f"; the latest valid checkpoint is step {latest[-1]}" if latest else "; no checkpoint written yet"
        return CheckpointError(f"cannot write checkpoint {step} in {self.dir}: {_first_line(err)}{kept}")

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_error(self._started, e) from e

    def _restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        step_dir = self.dir / str(step)
        _read_meta(step_dir)
        check_tree(step, step_dir, abstract_state)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        state = out["state"]
        jax.block_until_ready(state)
        meta = dict(out["meta"])
        inner = int(distributed.to_host(state.step))
        if inner != step:
            raise Damaged(f"step inside checkpoint is {inner}, not {step}")
        want = meta.get("tree_digest")
        if want and tree_digest(distributed.to_host(state)) != want:
            raise Damaged("contents differ from the digest written with them")
        return state, meta

    def _restore_variables(self, step: int) -> tuple[dict, dict]:
        """``({"step", "params", "batch_stats"}, meta)`` of checkpoint ``step``: only the network's variables and
        the step, read as host (NumPy) arrays in the tree the checkpoint's own metadata lists (nothing traced),
        then checked against the ``state_digest`` written with them (paths, dtypes, shapes and bytes)."""
        step_dir = self.dir / str(step)
        meta = _read_meta(step_dir)
        want = meta.get("state_digest") if isinstance(meta, dict) else None
        if not want:  # every checkpoint resflax writes has one (train, import, bn-stats)
            raise RestoreError(f"checkpoint {step} in {self.dir} has no state_digest in its meta: not a resflax "
                               "checkpoint; nothing was moved")
        item: dict = {k: {} for k in VARIABLES}
        for path in _stored_paths(step_dir):
            if path[0] in VARIABLES:
                node = item[path[0]]
                for k in path[1:-1]:
                    node = node.setdefault(k, {})
                node[path[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
            elif path == ("step",):
                item["step"] = ocp.RestoreArgs(restore_type=np.ndarray)
        if "step" not in item:
            raise Damaged("no step in the state")
        with interrupts.deferred():  # 0.3 s for ResNet-50; cut, Orbax's reader threads print tracebacks
            out = ocp.PyTreeCheckpointer().restore(
                step_dir / "state", args=ocp.args.PyTreeRestore(item=item, restore_args=item, partial_restore=True))
        inner = int(out["step"])
        if inner != step:
            raise Damaged(f"step inside checkpoint is {inner}, not {step}")
        variables = {k: out.get(k, {}) for k in VARIABLES}
        if tree_digest(variables) != want:
            raise Damaged("contents differ from the digest written with them")
        return {"step": inner, **variables}, meta

    def restore_latest(self, abstract_state: Any, max_step: int | None = None) -> tuple[Any, dict] | None:
        """The newest checkpoint (at most ``max_step``) that restores cleanly, as ``(state, meta)``; ``None`` if
        there is none. With ``abstract_state=None``, only the network's variables (``_restore_variables``:
        ``{"step", "params", "batch_stats"}`` as host arrays), which is all a reader needs.

        A damaged checkpoint is set aside (or, read-only, skipped) and the previous one tried; any other
        failure raises ``RestoreError`` with every checkpoint left in place."""
        for step in reversed(self.steps()):
            if max_step is not None and step > max_step:
                continue
            try:
                if abstract_state is None:
                    return self._restore_variables(step)
                return self._restore(step, abstract_state)
            except RestoreError:
                raise
            except Exception as e:  # noqa: BLE001 (classified: only damage moves on to the previous one)
                kind = classify_restore_error(e)
                if kind != "damage":
                    raise self._restore_error(step, kind, e) from e
                if self.read_only:
                    self._skip(step, e)
                else:
                    self._set_aside(step, e)
        return None

    def _restore_error(self, step: int, kind: str, err: BaseException) -> RestoreError:
        why = {"allocation": "out of memory", "device": "device error", "io": "I/O error",
               "unknown": "error"}[kind]
        hint = ("; nothing was moved (if its files are damaged, move it out of checkpoints/ and rerun)"
                if kind == "unknown" else "; nothing was moved, rerun when the cause is fixed")
        return RestoreError(f"cannot restore checkpoint {step} in {self.dir} ({why}: {_first_line(err)}){hint}")

    def _skip(self, step: int, err: Exception) -> None:
        self.skipped.append(step)
        log.info("checkpoint %s could not be restored", step, exc_info=err)
        if jax.process_index() == 0:
            print(f"WARNING: checkpoint {step} is damaged ({_first_line(err)}); skipped and left in place "
                  "(the next `resflax train` of this workdir sets it aside)", flush=True)

    def _set_aside(self, step: int, err: Exception) -> None:
        src = self.dir / str(step)
        self.damaged_dir.mkdir(parents=True, exist_ok=True)
        dst = self.damaged_dir / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        msg = _first_line(err)
        log.info("checkpoint %s could not be restored", step, exc_info=err)
        if jax.process_index() == 0:
            print(f"WARNING: checkpoint {step} is damaged ({msg}); moved to {dst}, trying the previous one",
                  flush=True)
            if src.exists():
                shutil.move(str(src), str(dst))
        _barrier(f"resflax-set-aside-{step}")
        self.manager.reload()

    def set_aside_after(self, step: int, why: str) -> list[int]:
        """Moves the checkpoints newer than ``step`` to ``checkpoints_damaged/<step>-ahead-<time>`` (kept, not
        deleted), so that training from ``step`` can write those steps again; returns their steps."""
        ahead = [s for s in self.steps() if s > step]
        for s in ahead:
            self.damaged_dir.mkdir(parents=True, exist_ok=True)
            dst = self.damaged_dir / f"{s}-ahead-{time.strftime('%Y%m%d-%H%M%S')}"
            shutil.move(str(self.dir / str(s)), str(dst))
            print(f"note: checkpoint {s} in {self.dir} is {why}; moved to {dst}, training goes on from {step}",
                  flush=True)
        if ahead:
            self.manager.reload()
        return ahead

    def close(self) -> None:
        try:
            if not self.read_only:
                self.wait()
        finally:
            self.manager.close()
