"""resflax's TensorBoard event writer against tensorboardX's own protocol buffers and CRC-32C."""

import struct

import pytest

from resflax.train import tbevents

pb = pytest.importorskip("tensorboardX.proto.event_pb2")
rw = pytest.importorskip("tensorboardX.record_writer")


def _records(data: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        header = data[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[i + 8:i + 12])[0] == rw.masked_crc32c(header)
        payload = data[i + 12:i + 12 + n]
        assert struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] == rw.masked_crc32c(payload)
        out.append(payload)
        i += 16 + n
    return out


def test_crc32c_known_values():
    # the CRC-32C check value (RFC 3720, B.4) and 32 bytes of zeros
    assert tbevents.crc32c(b"123456789") == 0xE3069283
    assert tbevents.crc32c(bytes(32)) == 0x8A9136AA
    for data in (b"", b"a", bytes(range(256)) * 3):
        assert tbevents.masked_crc32c(data) == rw.masked_crc32c(data)


@pytest.mark.parametrize("step", [1, 127, 128, 64_000, 2**40])
def test_events_decode_with_the_reference_protos(step):
    ev = pb.Event.FromString(tbevents.event(1.7e9 + 0.25, step, scalars={"train/loss": 2.302585, "test/error": 91.0}))
    assert ev.wall_time == 1.7e9 + 0.25 and ev.step == step
    assert [(v.tag, v.simple_value) for v in ev.summary.value] == [
        ("train/loss", pytest.approx(2.302585)), ("test/error", 91.0)]
    ev = pb.Event.FromString(tbevents.event(1.7e9, step, session_start=True))
    assert ev.session_log.status == pb.SessionLog.START and ev.step == step and not ev.summary.value
    ev = pb.Event.FromString(tbevents.event(1.7e9, file_version="brain.Event:2"))
    assert ev.file_version == "brain.Event:2" and ev.step == 0


def test_two_files_in_one_second_do_not_clobber(tmp_path):
    a, b = tbevents.EventFile(tmp_path), tbevents.EventFile(tmp_path)
    a.write(tbevents.event(1.7e9, 1, scalars={"x": 1.0}))
    b.write(tbevents.event(1.7e9, 2, scalars={"x": 2.0}))
    a.close()
    b.close()
    files = sorted(tmp_path.iterdir())
    assert len(files) == 2 and a.path != b.path
    steps = [[pb.Event.FromString(r).step for r in _records(f.read_bytes())] for f in (a.path, b.path)]
    assert steps == [[0, 1], [0, 2]]
