"""Orbax checkpoints of the train state, resilient to kills and damage.

Layout: ``WORKDIR/checkpoints/<step>/{state,meta}``; ``state`` is the TrainState pytree
(``StandardSave``), ``meta`` a JSON dict (config, digest, ...). Orbax writes each step into a temporary
directory and renames it when complete, so a kill mid-save leaves no half checkpoint among the steps. A
checkpoint that fails to restore (truncated or corrupted files) is moved to
``WORKDIR/checkpoints_damaged/`` (never deleted) with a one-line warning, and the previous one is tried;
``meta`` carries a digest of every leaf, so silently corrupted bytes count as damage too. When every checkpoint
is damaged the run starts from step 0 (training is deterministic, so it reproduces the same states; the
damaged ones stay in ``checkpoints_damaged/`` for inspection). A save that fails (disk full, not writable)
raises ``CheckpointError`` naming the step; Orbax's temporary directory is never taken for a checkpoint,
so the previous checkpoint stays the latest valid one, and stale temporary directories are removed on the
next start. Checkpoints are tensorstore arrays and JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from resflax.train import distributed
from resflax.train.state import tree_digest

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, workdir not writable, ...)."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)


class Checkpointer:
    def __init__(self, workdir: str | Path, keep: int = 3):
        self.dir = Path(workdir).absolute() / "checkpoints"
        self.damaged_dir = Path(workdir).absolute() / "checkpoints_damaged"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.dir, options=options, item_names=("state", "meta"))
        self._started = 0  # the step of the latest save started (an asynchronous failure belongs to it)

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, host_state: Any = None) -> None:
        """Starts an (asynchronous) save of ``state`` at ``step``; a failure raises ``CheckpointError`` here or
        from the next ``save``/``wait``. ``meta`` gets a digest of every leaf, checked on restore."""
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

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """The newest checkpoint that restores cleanly, as ``(state, meta)``; ``None`` if there is none."""
        for step in reversed(self.steps()):
            try:
                out = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                    ),
                )
                state = out["state"]
                jax.block_until_ready(state)
                meta = dict(out["meta"])
                inner = int(distributed.to_host(state.step))
                if inner != step:
                    raise ValueError(f"step inside checkpoint is {inner}, not {step}")
                want = meta.get("tree_digest")
                if want and tree_digest(distributed.to_host(state)) != want:
                    raise ValueError("contents differ from the digest written with them")
                return state, meta
            except Exception as e:  # noqa: BLE001 (any failure to read means: set it aside)
                self._set_aside(step, e)
        return None

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

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()
