"""Multi-host on one machine: 2 CPU processes (1 device each, gloo collectives, a localhost coordinator)
train in lockstep, are killed together mid-run, resume, and end with the same state_digest as 1 process
with 2 devices (``run_helpers.reference``). Only process 0 writes the workdir's logs and holds its lock."""

import json
import os
import re
import signal
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


def _stop_step(log_text: str) -> int:
    return int(re.findall(r"stopped by signal(?: on another process)? at step (\d+);", log_text)[-1])


@pytest.mark.slow
@pytest.mark.parametrize("who", ["one", "both"])
def test_sigterm_on_some_processes_stops_all_at_the_same_step(tmp_path, tmp_path_factory, who):
    """SIGTERM to process 1 only, or to both at different moments: the processes agree on the stop step (a
    check every 2 steps here), all save that step and exit 0; the rerun ends with the uninterrupted digest."""
    ref, _ = rh.reference(tmp_path_factory)
    cc = rh.cache_dir(tmp_path_factory)
    w = tmp_path / "run"
    args = ("--config.checkpoint_every_steps=1000", "--config.preemption_check_every_steps=2")
    procs = _start_both(w, tmp_path, cc, "a", *args)
    try:
        assert rh.wait_for_step(procs[0], w, 3) > 0, (tmp_path / "a0.log").read_text()[-3000:]
        os.kill(procs[1].pid, signal.SIGTERM)
        if who == "both":
            time.sleep(0.3)
            os.kill(procs[0].pid, signal.SIGTERM)
        rcs = [p.wait(timeout=60) for p in procs]
    finally:
        for p in procs:
            rh.kill9(p)
    logs = [(tmp_path / f"a{i}.log").read_text() for i in range(2)]
    assert rcs == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    stopped = _stop_step(logs[0])
    assert stopped % 2 == 0 and 3 <= stopped < rh.NUM_STEPS
    assert ("on another process" in logs[0]) == (who == "one")
    saved = sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [stopped]  # one checkpoint, written by both processes together
    procs = _start_both(w, tmp_path, cc, "b", *args)
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert f"resumed from step {stopped}" in (tmp_path / "b0.log").read_text()
    assert rh.digest(tmp_path / "b0.log") == rh.digest(tmp_path / "b1.log") == ref


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill9", "sigstop"])
def test_a_dead_peer_ends_the_others_within_60s(tmp_path, tmp_path_factory, how):
    """kill -9 of process 1 (its sockets close: the collective fails at once), or SIGSTOP (a hung peer: nothing
    fails, only the heartbeat watch notices): process 0 does not wait for JAX's own timeout; it ends within
    60 s (the peer timeout is 10 s here) with one clear line and exit 2; rerunning both reaches the
    uninterrupted digest."""
    ref, _ = rh.reference(tmp_path_factory)
    cc = rh.cache_dir(tmp_path_factory)
    w = tmp_path / "run"
    args = ("--config.checkpoint_every_steps=4", "--config.peer_timeout_s=10")
    procs = _start_both(w, tmp_path, cc, "a", *args)
    try:
        assert rh.wait_for_step(procs[0], w, 5) > 0, (tmp_path / "a0.log").read_text()[-3000:]
        if how == "kill9":
            rh.kill9(procs[1])
        else:
            os.kill(procs[1].pid, signal.SIGSTOP)
        t0 = time.time()
        rc = procs[0].wait(timeout=90)
        took = time.time() - t0
    finally:
        for p in procs:
            rh.kill9(p)
    log = (tmp_path / "a0.log").read_text()
    assert rc == 2 and took < 60, (rc, took, log[-2000:])
    last = [ln for ln in log.splitlines() if ln.startswith("resflax: error:")]
    # a killed peer's sockets close, so a collective in flight fails at once; between collectives (or when the
    # transport does not notice) the heartbeat watch is what ends the survivor; a hung peer only the watch sees
    whys = ("process 1 of 2 stopped answering",) + (("a collective lost another process",) if how == "kill9" else ())
    assert len(last) == 1 and any(w in last[0] for w in whys) and "rerun every process" in last[0], last
    procs = _start_both(w, tmp_path, cc, "b", *args)
    assert [p.wait(timeout=300) for p in procs] == [0, 0], (tmp_path / "b0.log").read_text()[-2000:]
    assert rh.digest(tmp_path / "b0.log") == rh.digest(tmp_path / "b1.log") == ref
