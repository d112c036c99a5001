"""``quiet_absl()``: absl (TFDS, Orbax) WARNING lines silenced for a block whose outcome resflax reports itself."""

from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def quiet_absl():
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
