"""The errors resflax raises on purpose, and the exit code each one means on the command line.

- 0: done, or stopped by SIGTERM/SIGINT after writing a checkpoint.
- 1: internal error: a bug, or an unexpected failure inside JAX/XLA/Orbax; the traceback goes to stderr and
  to ``WORKDIR/errors.log`` (``train``, ``import``) or, for the commands that only read a workdir, to the
  user's cache folder (``configs.user_cache_dir()/errors``). Anything not listed below.
- 2: bad input (config, flags, data, workdir) ``BadInput``/``DataError``/``WorkdirError``; a file that could
  not be written ``WriteError``/``CheckpointError``; a checkpoint that could not be restored for a reason
  other than damage ``RestoreError``; a peer process that died ``PeerError``.
- 3: divergence, a non-finite loss or parameter (the last good checkpoint is kept) ``DivergenceError``.
- 130: a second SIGINT/SIGTERM while stopping.

Exit codes 2 and 3 come with one line on stderr; nothing already written is lost.
"""

from __future__ import annotations

INTERNAL_ERROR = 1


class ResflaxError(Exception):
    """An expected failure, reported in one line with ``exit_code``."""

    exit_code = 2


class BadInput(ResflaxError, ValueError):
    """A config value, flag or argument that cannot be used."""


class DataError(ResflaxError, RuntimeError):
    """The dataset could not be found or prepared; the message says where we looked and what to do."""


class WorkdirError(ResflaxError, RuntimeError):
    """The workdir cannot be used as asked (in use, another experiment, not writable)."""


class WriteError(ResflaxError, RuntimeError):
    """An output file (config.json, metrics.jsonl, TensorBoard events, a report) could not be written."""


class CheckpointError(WriteError):
    """A checkpoint could not be written (disk full, workdir not writable, ...)."""


class RestoreError(ResflaxError, RuntimeError):
    """A checkpoint could not be restored for a reason other than its own damaged bytes; nothing was moved."""


class PeerError(ResflaxError, RuntimeError):
    """Another process of a multi-process run died or stopped answering."""


class DivergenceError(ResflaxError, RuntimeError):
    """The loss or the parameters became non-finite."""

    exit_code = 3
