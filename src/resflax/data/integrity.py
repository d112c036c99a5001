"""A prepared TFDS dataset's files checked against its own metadata before a run reads them.

TFDS's ``dataset_info.json`` lists each split's files (``filepathTemplate``, one entry of ``shardLengths`` per
file) and how many records each holds. ``check_files`` requires every file of the splits a run reads to exist
and to hold exactly that many records, read from the ArrayRecord file's own index at its end (no record is
decoded: ~0.2 ms a file from the page cache; a file cut short has no index and reads as 0 records). So a
deleted or truncated file fails at the start, in one line that names it and says what to do, before a workdir
is created, instead of at the first step that reads it, or after a whole epoch. (``numBytes`` in the metadata
is the examples' size before ArrayRecord's compression, not a file size: it cannot be checked.) A file is read
once per process while its size and modification time stay the same: a second look at the same dataset (the
task opening it again after the run's plan found it) only calls ``stat``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from resflax.errors import DataError


class DamagedData(DataError):
    """A prepared dataset with a missing or truncated file: an error wherever the dataset is looked for (no
    other copy is used instead, no preparation attempted over it)."""


_CHECKED: dict[str, tuple[int, int, int]] = {}  # path -> (size, mtime_ns, inode) of a file found complete


def _records(path: str) -> int:
    """The number of records an ArrayRecord file's index lists; 0 if it has none (cut short, damaged)."""
    # noqa reason: array_record's C extension is loaded only when a data check runs (start-up time)
    from array_record.python.array_record_module import ArrayRecordReader  # noqa: PLC0415

    try:
        reader = ArrayRecordReader(path, "readahead_buffer_size:0")
    except Exception:  # noqa: BLE001 (pybind11 raises RuntimeError/ValueError/OSError)
        return 0
    n = reader.num_records() if reader.ok() else 0
    try:
        reader.close()  # raises the reader's error, e.g. "Failed to read RiegeliPostscript"
    except Exception:  # noqa: BLE001
        n = 0
    return n


def _problem(path: str, records: int) -> str | None:
    """What is wrong with one file that should hold ``records`` records, or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "is missing"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "is not a file"
    key = (st.st_size, st.st_mtime_ns, st.st_ino)
    if _CHECKED.get(path) == key:
        return None
    if not os.access(path, os.R_OK):
        return "cannot be read (permission denied)"
    n = _records(path)
    if n != records:
        return f"is truncated or damaged: {st.st_size} bytes, {n} of its {records} records readable"
    _CHECKED[path] = key
    return None


def check_files(info, splits: Iterable[str], fix: str) -> None:
    """Checks every file of ``splits`` of the prepared dataset ``info`` (a TFDS ``DatasetInfo`` read from its
    folder) against the metadata; ``DamagedData`` naming the first bad file and ending with ``fix`` (what to
    do) otherwise. Nothing to check without a ``dataset_info.json`` in ``info.data_dir`` or without split
    metadata (``tfds.testing.mock_data``'s sources have no files)."""
    folder = Path(info.data_dir)
    if not info.splits or not (folder / "dataset_info.json").is_file():
        return
    for split in splits:
        if split not in info.splits:
            raise DamagedData(f"{info.name} {info.version} in {folder}: dataset_info.json lists no {split} split; "
                              f"{fix}")
        files = info.splits[split].file_instructions
        for k, f in enumerate(files):
            if (problem := _problem(os.fspath(f.filename), int(f.examples_in_shard))) is not None:
                raise DamagedData(f"{info.name} {info.version} is incomplete: {f.filename} ({split} file {k + 1} of "
                                  f"{len(files)}) {problem}; {fix}")
