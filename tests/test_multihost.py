"""Multi-host on one machine: 2 CPU processes (1 device each, gloo collectives, a localhost coordinator)
train in lockstep, are killed together mid-run, resume, and end with the same state_digest as 1 process
with 2 devices (``run_helpers.reference``). Only process 0 writes the workdir's logs and holds its lock."""

import json
import time

import pytest
import run_helpers as rh

from resflax.train import workdir as wd


def _start_both(w, tmp_path, cc, tag, *extra):
    port = rh.free_port()
    return [rh.start(w, tmp_path / f"{tag}{i}.log",
                     rh.env(cc, devices=1, RESFLAX_COORDINATOR=f"127.0.0.1:{port}", RESFLAX_NUM_PROCESSES=2,
                            RESFLAX_PROCESS_ID=i), *extra)
            for i in range(2)]


@pytest.mark.slow
def test_two_processes_match_two_devices_through_kill_and_resume(tmp_path, tmp_path_factory):
    ref, ref_dir = rh.reference(tmp_path_factory)
    cc = rh.cache_dir(tmp_path_factory)
    w = tmp_path / "run"
    args = ("--config.checkpoint_every_steps=4",)
    # workdir in use: process 0 refuses in one line, process 1 follows its verdict (no hang), both exit 2
    w.mkdir()
    lock = wd.Lock(w)
    lock.acquire()
    try:
        procs = _start_both(w, tmp_path, cc, "busy", *args)
        assert [p.wait(timeout=120) for p in procs] == [2, 2]
    finally:
        lock.release()
    last = [(tmp_path / f"busy{i}.log").read_text().strip().splitlines()[-1] for i in range(2)]
    assert "is in use by pid" in last[0] and "process 0 could not use workdir" in last[1], last
    assert sorted(p.name for p in w.iterdir()) == [".lock"]

    procs = _start_both(w, tmp_path, cc, "a", *args)
    try:
        assert rh.wait_for_step(procs[0], w, 9) > 0, (tmp_path / "a0.log").read_text()[-3000:]
        holder = (w / ".lock").read_text()
        assert holder.startswith(f"pid {procs[0].pid} ")  # process 0 holds the lock, process 1 did not block
        time.sleep(0.1)
    finally:
        for p in procs:
            rh.kill9(p)
    saved = sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] >= 4
    procs = _start_both(w, tmp_path, cc, "b", *args)
    rcs = [p.wait(timeout=300) for p in procs]
    logs = [(tmp_path / f"b{i}.log").read_text() for i in range(2)]
    assert rcs == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert f"resumed from step {saved[-1]}" in logs[0]
    assert rh.digest(tmp_path / "b0.log") == rh.digest(tmp_path / "b1.log") == ref
    # only process 0 logs: its lines once each, and the same metrics as the 1-process run
    assert "CIFAR-10 from" not in logs[1] and "resumed" not in logs[1]
    assert rh.metrics(w) == rh.metrics(ref_dir)
    data = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines() if '"event": "data"' in x]
    assert [(d["processes"], d["devices"]) for d in data] == [(2, 2), (2, 2)]
