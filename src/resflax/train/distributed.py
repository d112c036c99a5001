"""Multi-host setup and host views of replicated arrays.

``jax.distributed.initialize`` is called when the config (``coordinator_address``, ``num_processes``,
``process_id``) or the environment (``RESFLAX_COORDINATOR``, ``RESFLAX_NUM_PROCESSES``,
``RESFLAX_PROCESS_ID``) asks for it; on TPU pods and SLURM, ``distributed="auto"`` lets JAX detect the
cluster. On CPU the processes talk through gloo collectives. Every process holds the (small) CIFAR-10
arrays; inside the step each device reads only its own slice of the global batch.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from resflax.errors import BadInput

_initialized = False


def maybe_initialize(config: Any = None) -> bool:
    """Initialises multi-process JAX if asked to; returns True if running multi-process."""
    global _initialized
    if _initialized:
        return jax.process_count() > 1

    def get(key: str, env: str):
        val = config.get(key) if config is not None and hasattr(config, "get") else None
        return val if val not in (None, "") else os.environ.get(env)

    addr = get("coordinator_address", "RESFLAX_COORDINATOR")
    mode = config.get("distributed") if config is not None and hasattr(config, "get") else None
    mode = mode or os.environ.get("RESFLAX_DISTRIBUTED")
    if mode not in (None, "", "auto", "off"):
        raise BadInput(f"distributed must be 'auto', 'off' or unset, got {mode!r}")
    if mode == "off" or (not addr and mode != "auto"):
        return False
    kw = {}
    if addr:
        try:
            n = int(get("num_processes", "RESFLAX_NUM_PROCESSES"))
            pid = int(get("process_id", "RESFLAX_PROCESS_ID"))
        except (TypeError, ValueError):
            raise BadInput(f"coordinator_address {addr!r} needs num_processes and process_id (config or "
                             "RESFLAX_NUM_PROCESSES/RESFLAX_PROCESS_ID)") from None
        if not 0 <= pid < n:
            raise BadInput(f"process_id {pid} is not in [0, {n})")
        kw = dict(coordinator_address=addr, num_processes=n, process_id=pid)
    # CPU processes need a collectives implementation for cross-process pmean (no effect on GPU/TPU).
    # Must be set before the backend starts, so no jax.devices()/default_backend() call precedes it.
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # noqa: BLE001 (a JAX without the option)
        pass
    jax.distributed.initialize(**kw)
    _initialized = True
    return jax.process_count() > 1


def to_host(tree: Any) -> Any:
    """``jax.device_get`` that also works for replicated arrays spanning several processes."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_shards[0].data)
        return jax.device_get(x)

    return jax.tree_util.tree_map(one, tree)
