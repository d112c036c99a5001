"""TensorBoard event files for scalars, written directly: TFRecord framing (length, masked CRC-32C, payload,
masked CRC-32C) around hand-encoded ``tensorflow.Event`` protocol buffers.

TensorBoard reads these like any other ``events.out.tfevents.*`` file. Writing them here, synchronously and
without a writer thread, means a failed write raises in the caller (a full disk is one clear error, not a dead
thread), and no TensorFlow, tensorboardX or torch is imported at start-up (tensorboardX imports torch when
it is installed: 1.5-2 s for every ``resflax`` command on a machine that has both).

Only what resflax logs is encoded: the file-version record, scalar summaries (``simple_value``) and the
``SessionLog.START`` record with which a resumed run tells TensorBoard to hide the events an earlier start
wrote from that step on.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

# CRC-32C (Castagnoli), reflected polynomial 0x82F63B78, one table of 256 entries
_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The CRC as TFRecord stores it (rotated right by 15 bits plus a constant)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(payload: bytes) -> bytes:
    """One TFRecord: uint64 length, masked CRC of the length, the payload, masked CRC of the payload."""
    header = struct.pack("<Q", len(payload))
    return (header + struct.pack("<I", masked_crc32c(header)) + payload
            + struct.pack("<I", masked_crc32c(payload)))


# --- protocol buffer wire format (only the field types the Event message needs) ---

def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 fields encode negatives as ten-byte two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _bytes_field(field: int, value: bytes) -> bytes:
    return _key(field, 2) + _varint(len(value)) + value


def event(wall_time: float, step: int = 0, *, file_version: str | None = None,
          scalars: dict[str, float] | None = None, session_start: bool = False) -> bytes:
    """An encoded ``Event``: wall_time (1, double), step (2, int64) and one of file_version (3, string),
    summary (5: repeated ``Summary.Value`` {tag (1, string), simple_value (2, float)}) or session_log
    (7: ``SessionLog`` {status (1, enum), START = 1})."""
    if (file_version is not None) + bool(scalars) + session_start > 1:
        raise ValueError("an Event holds one of file_version, scalars, session_start")
    out = _key(1, 1) + struct.pack("<d", wall_time)
    if step:
        out += _key(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _key(2, 5) + struct.pack("<f", float(v)))
                          for tag, v in scalars.items())
        out += _bytes_field(5, values)
    if session_start:
        out += _bytes_field(7, _key(1, 0) + _varint(1))
    return out


class EventFile:
    """``LOGDIR/events.out.tfevents.<time>.<host>.<pid>``, opened exclusively (a second start in the same
    second gets its own file), every record flushed as it is written."""

    def __init__(self, logdir: Path):
        logdir.mkdir(parents=True, exist_ok=True)
        base = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        for n in range(1000):
            self.path = logdir / (base if n == 0 else f"{base}.{n}")
            try:
                self._f = open(self.path, "xb")  # noqa: SIM115 (closed by close())
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"{logdir}: too many event files named {base}*")
        self.write(event(time.time(), file_version="brain.Event:2"))

    def write(self, payload: bytes) -> None:
        self._f.write(record(payload))
        self._f.flush()

    def close(self) -> None:
        self._f.close()
