"""resflax's cache folder (``cache_dir``), and cache files written atomically: a temporary file in the same
folder, renamed into place, so a crash or a full disk never leaves half a file where a later start would read
it."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from resflax.configs import user_cache_dir


def save_atomically(path: str | os.PathLike, save: Callable[[BinaryIO], None]) -> None:
    """``save(f)`` into a temporary file next to ``path``, then renamed to ``path``; on any failure the
    temporary file is removed and the error raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # created as open(2) creates any file (0o666 less the umask), not mkstemp's 0o600: the file is the user's
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            save(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cache_dir(config) -> Path:
    """resflax's cache: ImageNet per-pixel means, CIFAR-10's decoded arrays (``config.mean_cache_dir``, else
    ``configs.user_cache_dir()``: ``$XDG_CACHE_HOME/resflax`` or ``~/.cache/resflax``)."""
    if config.get("mean_cache_dir"):
        return Path(config.mean_cache_dir).expanduser()
    return user_cache_dir()
