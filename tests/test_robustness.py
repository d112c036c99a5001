"""Never lose a run (issue 6): kill -9 anywhere, SIGTERM/SIGINT, damaged checkpoints, disk full, busy workdir.

The subprocess tests run ``tests/train_driver.py`` (mock data, 2 CPU devices) and compare the final
``state_digest`` with an uninterrupted run of the same command (``run_helpers.reference``).
"""

import errno
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import run_helpers as rh
from conftest import damage
from orbax.checkpoint._src.handlers import json_checkpoint_handler
from orbax.checkpoint._src.serialization import jax_array_handlers
from test_train import _ckpt_steps, mock, tiny_config

from resflax import cli
from resflax.train import evaluate, loop


def _tmp_dirs(workdir: Path) -> list[Path]:
    d = workdir / "checkpoints"
    return [p for p in d.iterdir() if "tmp" in p.name] if d.exists() else []


@pytest.mark.slow
def test_kill9_anywhere_then_rerun_gives_the_same_digest(tmp_path, tmp_path_factory):
    """kill -9 at random moments (startup, mid-step, mid-eval, mid-save with a checkpoint every step),
    plus an Orbax temporary directory left behind on purpose; rerunning the command ends bit-identical."""
    ref, ref_dir = rh.reference(tmp_path_factory)
    seed = int(os.environ.get("RESFLAX_KILL_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    e = rh.env(rh.cache_dir(tmp_path_factory))
    w, log = tmp_path / "run", tmp_path / "log"
    args = ("--config.checkpoint_every_steps=1", "--config.keep_checkpoints=2")
    notes = []
    # 1: during startup (restore/compile), before any step
    p = rh.start(w, log, e, *args)
    time.sleep(rng.uniform(0.5, 3.0))
    rh.kill9(p)
    notes.append(("startup", rh.train_step(w), len(_tmp_dirs(w))))
    # 2-4: a random moment after training made progress
    for _ in range(3):
        p = rh.start(w, log, e, *args)
        reached = rh.wait_for_step(p, w, min(rh.train_step(w) + rng.randint(1, 4), rh.NUM_STEPS - 1))
        if reached < 0:
            break  # finished before we could kill it
        time.sleep(rng.uniform(0.0, 0.3))
        rh.kill9(p)
        notes.append(("running", rh.train_step(w), len(_tmp_dirs(w))))
    print(f"seed {seed}: (moment, last step logged, orbax tmp dirs left) = {notes}")
    # the lock of a killed run is not stuck: the next run starts; a stale Orbax tmp dir is never a checkpoint
    steps = _ckpt_steps(w)
    assert steps, notes
    fake = w / "checkpoints" / f"{steps[-1] + 1}.orbax-checkpoint-tmp-1234567890"
    shutil.copytree(w / "checkpoints" / str(steps[-1]), fake)
    next(p for p in fake.rglob("*") if p.is_file()).write_bytes(b"half")
    before = log.read_text()
    rc = rh.run(w, log, e, *args)
    out = log.read_text()[len(before):]
    assert rc == 0, out[-2000:]  # the first rerun finishes: a crash on resume fails the test
    assert f"resumed from step {steps[-1]}" in out, out[-2000:]
    assert not fake.exists() and not _tmp_dirs(w) and "WARNING: checkpoint" not in out
    assert rh.digest(log) == ref, out[-2000:]
    assert rh.metrics(w) == rh.metrics(ref_dir)  # metrics.jsonl line for line as the uninterrupted run


@pytest.mark.slow
def test_sigterm_and_sigint_checkpoint_and_exit_0(tmp_path, tmp_path_factory):
    """SIGTERM then SIGINT mid-run: each finishes its step, checkpoints it, exits 0 within seconds; a second
    run on the busy workdir is refused meanwhile; the resumed run ends with the uninterrupted digest."""
    ref, _ = rh.reference(tmp_path_factory)
    e = rh.env(rh.cache_dir(tmp_path_factory))
    w, log = tmp_path / "run", tmp_path / "log"
    for sig, at in ((signal.SIGTERM, 3), (signal.SIGINT, 12)):
        p = rh.start(w, log, e, "--config.checkpoint_every_steps=1000")
        assert rh.wait_for_step(p, w, at) > 0
        if sig == signal.SIGTERM:  # busy workdir: refused in one line, nothing touched
            cfg = (w / "config.json").read_text()
            with mock():
                rc = cli.main(["train", *rh.BASE_ARGS, f"--workdir={w}"])
            assert rc == 2 and (w / "config.json").read_text() == cfg
        t0 = time.time()
        os.kill(p.pid, sig)
        rc = p.wait(timeout=60)
        took = time.time() - t0
        text = log.read_text()
        assert rc == 0, text[-2000:]
        assert took < 20, took
        stopped = int(text.rsplit("stopped by signal at step ", 1)[1].split(";")[0])
        assert at <= stopped < rh.NUM_STEPS and _ckpt_steps(w)[-1] == stopped
    assert rh.run(w, log, e, "--config.checkpoint_every_steps=1000") == 0
    assert rh.digest(log) == ref


def test_busy_workdir_message(tmp_path, capsys):
    from resflax.train import workdir as wd

    lock = wd.Lock(tmp_path)
    lock.acquire()
    try:
        with mock():
            rc = cli.main(["train", "--config=experiments/cifar10.py:resnet8", f"--workdir={tmp_path}"])
    finally:
        lock.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "in use by pid" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


# ---- damaged checkpoints (in process, mock data)

@pytest.mark.parametrize("how", ["truncate", "garbage", "meta", "empty"])
def test_damaged_latest_checkpoint_is_set_aside(tmp_path, pristine, capsys, how):
    src, want = pristine
    w = tmp_path / "run"
    shutil.copytree(src, w)
    damage(w / "checkpoints" / "6", how)
    capsys.readouterr()
    with mock():
        out = loop.train_and_evaluate(tiny_config(), str(w))
        printed = capsys.readouterr().out
        warnings = [ln for ln in printed.splitlines() if "WARNING" in ln]
        assert len(warnings) == 1 and "checkpoint 6 is damaged" in warnings[0], printed
        assert "resumed from step 3" in printed
        assert out["state_digest"] == want and _ckpt_steps(w) == [3, 6]
        assert [p.name.split("-")[0] for p in (w / "checkpoints_damaged").iterdir()] == ["6"]  # kept, not deleted
        again = loop.train_and_evaluate(tiny_config(), str(w))  # no crash loop: the new 6 is fine
    printed = capsys.readouterr().out
    assert "WARNING" not in printed and "resumed from step 6" in printed and again["state_digest"] == want


def test_all_checkpoints_damaged_starts_from_scratch(tmp_path, pristine, capsys):
    """Decision: every checkpoint damaged -> each is set aside with its warning, the run starts at step 0
    (deterministic: it reproduces the same states) and ends with the same digest."""
    src, want = pristine
    w = tmp_path / "run"
    shutil.copytree(src, w)
    damage(w / "checkpoints" / "6", "truncate")
    damage(w / "checkpoints" / "3", "meta")
    capsys.readouterr()
    with mock():
        out = loop.train_and_evaluate(tiny_config(), str(w))
    printed = capsys.readouterr().out
    assert [ln.split(" is damaged")[0] for ln in printed.splitlines() if "WARNING" in ln] == \
        ["WARNING: checkpoint 6", "WARNING: checkpoint 3"]
    assert "resumed" not in printed and out["state_digest"] == want
    assert len(list((w / "checkpoints_damaged").iterdir())) == 2
    rows = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("split") == "train"] == [1, 2, 3, 4, 5, 6]  # no duplicated lines


@pytest.mark.parametrize("where", ["json", "arrays"])
def test_disk_full_when_saving_keeps_the_previous_checkpoint(tmp_path, pristine, capsys, monkeypatch, where):
    """ENOSPC inside Orbax's save of checkpoint 6, in the JSON metadata or in the tensorstore write of the
    arrays: one line, exit 2, checkpoint 3 still the latest valid one; freeing space and rerunning ends with
    the uninterrupted digest. Also: cli.main takes --config.* from its argv (not sys.argv)."""
    _, want = pristine
    w = tmp_path / "run"
    argv = ["train", "--config=experiments/cifar10.py:resnet8", f"--workdir={w}", "--config.batch_size=16",
            "--config.eval_batch_size=32", "--config.num_steps=6", "--config.lr_boundaries=(4,5)",
            "--config.checkpoint_every_steps=3", "--config.log_every_steps=1", "--config.eval_every_steps=3",
            "--config.progress=False"]
    orig = json_checkpoint_handler.JsonCheckpointHandler._save_fn
    orig_arrays = jax_array_handlers._serialize_arrays
    saves = []

    async def full(self, x, directory):
        if x.get("step") == 6:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await orig(self, x, directory)

    def full_arrays(*a, **k):  # the arrays of the second save (checkpoint 6; checkpoint 3 is written first)
        saves.append(1)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return orig_arrays(*a, **k)

    if where == "json":
        monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full)
    else:
        monkeypatch.setattr(jax_array_handlers, "_serialize_arrays", full_arrays)
    capsys.readouterr()
    with mock():
        rc = cli.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        assert "cannot write checkpoint 6" in err[0] and "No space left on device" in err[0], err
        assert "latest valid checkpoint is step 3" in err[0]
        assert _ckpt_steps(w) == [3]
        _, _, state = evaluate.restore(w)
        assert int(state.step) == 3
        monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", orig)
        monkeypatch.setattr(jax_array_handlers, "_serialize_arrays", orig_arrays)
        assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "resumed from step 3" in out and f"state_digest {want[:16]}" in out and not _tmp_dirs(w)


def test_cli_bad_input_in_process(tmp_path, capsys):
    """More bad input, one line each, exit 2, nothing written (in process: also shows main(argv) works)."""
    (tmp_path / "afile").write_text("x")
    cfg = "--config=experiments/cifar10.py:resnet8"
    cases = [
        ([cfg, f"--workdir={tmp_path / 'afile' / 'w'}"], "cannot create workdir"),
        ([cfg, f"--workdir={tmp_path / 'w'}", "--config.coordinator_address=localhost:1"], "needs num_processes"),
        ([cfg, f"--workdir={tmp_path / 'w'}", "--config.distributed=yes"], "distributed must be"),
        ([cfg, f"--workdir={tmp_path / 'w'}", "--config.batch_size=0"], "batch_size must be positive"),
        ([cfg, f"--workdir={tmp_path / 'w'}", "--config.model=resnet"], "resnet"),
        (["--config=experiments/nonexistent.py", f"--workdir={tmp_path / 'w'}"], "nonexistent"),
    ]
    for args, msg in cases:
        capsys.readouterr()
        with mock():
            rc = cli.main(["train", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and msg in err[0], (args, err)
        assert not (tmp_path / "w").exists()


def test_no_unpickling_and_no_shell_for_config_paths(tmp_path, pristine, monkeypatch):
    """Safety: resuming restores with pickle disabled (Orbax reads tensorstore arrays and JSON), and a workdir
    full of shell metacharacters is used literally (paths from configs never pass through a shell)."""
    import pickle

    def refuse(*a, **k):
        raise AssertionError("something tried to unpickle")

    src, want = pristine
    w = tmp_path / "a b;touch PWNED;$(touch PWNED2)'\""
    shutil.copytree(src, w)
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    with mock():
        out = loop.train_and_evaluate(tiny_config(), str(w))
    assert out["state_digest"] == want and out["step"] == 6
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))
