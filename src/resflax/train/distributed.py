"""Multi-host setup and host views of replicated arrays.

``jax.distributed.initialize`` is called when the config (``coordinator_address``, ``num_processes``,
``process_id``) or the environment (``RESFLAX_COORDINATOR``, ``RESFLAX_NUM_PROCESSES``,
``RESFLAX_PROCESS_ID``) asks for it; on TPU pods and SLURM, ``distributed="auto"`` lets JAX detect the
cluster. On CPU the processes talk through gloo collectives. Every process holds the (small) CIFAR-10
arrays; inside the step each device reads only its own slice of the global batch.

Processes that must act together agree first: a stop requested by a signal on any process becomes every
process's stop at the same step (``any_process``), and a ``PeerWatch`` notices a process that died, so that
the others end with a clear message instead of waiting in a collective for JAX's own, much longer, timeout.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from resflax.errors import BadInput, PeerError

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
    # JAX's own detection of a dead process aborts the survivors; resflax's PeerWatch (peer_timeout_s) acts
    # first, with a clear message and exit code 2.
    jax.distributed.initialize(**kw, heartbeat_timeout_seconds=max(100, 3 * peer_timeout(config)))
    _initialized = True
    return jax.process_count() > 1


def peer_timeout(config: Any = None) -> int:
    value = config.get("peer_timeout_s") if config is not None and hasattr(config, "get") else None
    return int(value) if value else 30


_PEER_WORDS = ("Gloo", "Connection reset", "connection reset", "Connection closed", "Broken pipe", "UNAVAILABLE",
               "heartbeat", "DEADLINE_EXCEEDED", "Socket closed")


def peer_lost(err: BaseException) -> bool:
    """Whether ``err`` (raised in a multi-process run) says a collective lost another process."""
    while err is not None:
        if isinstance(err, jax.errors.JaxRuntimeError) and any(w in str(err) for w in _PEER_WORDS):
            return True
        err = err.__cause__ or err.__context__
    return False


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is True on any of them (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


class PeerWatch:
    """Notices a process of this run that died (or hangs): each process publishes a heartbeat counter in the
    coordination service's key-value store every ``interval`` seconds, from a thread that runs while the main
    thread waits in a collective. A peer whose counter has not moved for ``timeout`` seconds, or a coordinator
    that stopped answering for as long, ends this process with one line on stderr and exit code 2. Checkpoints
    already written stay valid; rerunning every process with the same command resumes from the latest."""

    PREFIX = "resflax/alive/"

    def __init__(self, timeout: float = 30.0, interval: float | None = None):
        self.timeout = float(timeout)
        self.interval = interval or max(0.5, min(2.0, self.timeout / 10))
        self.me, self.n = jax.process_index(), jax.process_count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = None

    def __enter__(self):
        if self.n == 1:
            return self
        try:
            # JAX's private API, looked up only here (inside the try): a JAX without it runs with no watch
            from jax._src import distributed as jax_distributed  # noqa: PLC0415

            self._client = jax_distributed.global_state.client
        except Exception:  # noqa: BLE001 (a JAX without this private API: no watch, JAX's own timeout applies)
            self._client = None
        if self._client is not None:
            self._thread = threading.Thread(target=self._run, name="resflax-peer-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            try:  # a process that ended on purpose is not a dead peer for the ones still finishing
                self._client.key_value_set(f"{self.PREFIX}{self.me}", "done", allow_overwrite=True)
            except Exception:  # noqa: BLE001
                pass

    def _run(self) -> None:
        beat, start = 0, time.monotonic()
        seen = {i: (None, start) for i in range(self.n) if i != self.me}
        contact = start
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            try:
                self._client.key_value_set(f"{self.PREFIX}{self.me}", str(beat), allow_overwrite=True)
                beat += 1
                values = dict(self._client.key_value_dir_get(self.PREFIX))
                contact = now
            except Exception as e:  # noqa: BLE001
                if now - contact > self.timeout and not self._stop.is_set():
                    self.die(f"lost contact with the coordinator (process 0) for {now - contact:.0f}s "
                              f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})")
                continue
            for i, (old, _) in seen.items():
                value = values.get(f"{self.PREFIX}{i}")
                if value != old or value == "done":
                    seen[i] = (value, now)
            dead = sorted(i for i, (_, t) in seen.items() if now - t > self.timeout)
            if dead and not self._stop.is_set():
                self.die(f"process {', '.join(map(str, dead))} of {self.n} stopped answering for "
                          f"{self.timeout:.0f}s (it died or was preempted)")

    def die(self, why: str) -> None:
        """Ends this process at once (exit 2): JAX's exit handler would wait for the dead peer at its shutdown
        barrier. Checkpoint writes already finished are complete; one in flight is an Orbax temporary
        directory that the next start removes."""
        print(f"resflax: error: {why}; this process (process {self.me}) stops too. Checkpoints already written "
              "are kept: rerun every process with the same command to resume", file=sys.stderr, flush=True)
        os._exit(PeerError.exit_code)


def to_host(tree: Any) -> Any:
    """``jax.device_get`` that also works for replicated arrays spanning several processes."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_shards[0].data)
        return jax.device_get(x)

    return jax.tree_util.tree_map(one, tree)
