"""Orbax checkpoints of the train state, resilient to kills and damage.

Layout: ``WORKDIR/checkpoints/<step>/{state,meta}``; ``state`` is the TrainState pytree
(``StandardSave``), ``meta`` a JSON dict (config, digest, ...). Orbax writes each step into a temporary
directory and renames it when complete, so a kill mid-save leaves no half checkpoint among the steps. A
checkpoint that fails to restore (truncated or corrupted files) is moved to
``WORKDIR/checkpoints_damaged/`` (never deleted) with a one-line warning, and the previous one is tried.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, workdir: str | Path, keep: int = 3):
        self.dir = Path(workdir).absolute() / "checkpoints"
        self.damaged_dir = Path(workdir).absolute() / "checkpoints_damaged"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.dir, options=options, item_names=("state", "meta"))

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

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
                if int(jax.device_get(state.step)) != step:
                    raise ValueError(f"step inside checkpoint is {int(state.step)}, not {step}")
                return state, dict(out["meta"])
            except Exception as e:  # noqa: BLE001 (any failure to read means: set it aside)
                self._set_aside(step, e)
        return None

    def _set_aside(self, step: int, err: Exception) -> None:
        src = self.dir / str(step)
        self.damaged_dir.mkdir(parents=True, exist_ok=True)
        dst = self.damaged_dir / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        log.warning("checkpoint %s is damaged (%s); moved to %s, trying the previous one", step, msg, dst)
        print(f"WARNING: checkpoint {step} is damaged ({msg}); moved to {dst}", flush=True)
        if jax.process_index() == 0 and src.exists():
            shutil.move(str(src), str(dst))
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
