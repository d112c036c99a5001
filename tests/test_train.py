"""The training loop end to end: resume bit for bit, divergence guard, workdir and config errors, real data."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest
import tensorflow_datasets as tfds
from test_schedules import load_experiment

from resflax import cli as resflax_cli
from resflax.models import get_model
from resflax.train import evaluate, loop
from resflax.train import state as state_lib
from resflax.train import workdir as wd

ROOT = Path(__file__).resolve().parents[1]
REAL = os.environ.get("TFDS_DATA_DIR")
needs_real = pytest.mark.skipif(not REAL or not (Path(REAL) / "cifar10").exists(),
                                reason="TFDS_DATA_DIR without cifar10")


def tiny_config(**kw):
    c = load_experiment().get_config("resnet8")
    c.update(dict(batch_size=16, eval_batch_size=32, num_steps=6, lr_boundaries=(4, 5),
                  checkpoint_every_steps=3, log_every_steps=1, eval_every_steps=3, progress=False))
    c.update(kw)
    return c


def mock():
    return tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE)


def test_resume_is_bit_exact(tmp_path):
    with mock():
        straight = loop.train_and_evaluate(tiny_config(), str(tmp_path / "a"))
        first = loop.train_and_evaluate(tiny_config(num_steps=3), str(tmp_path / "b"))
        resumed = loop.train_and_evaluate(tiny_config(), str(tmp_path / "b"))
    assert first["step"] == 3 and resumed["step"] == straight["step"] == 6
    assert resumed["state_digest"] == straight["state_digest"]
    assert first["state_digest"] != straight["state_digest"]
    assert resumed["test_error"] == straight["test_error"]
    # metrics.jsonl of the resumed run equals the uninterrupted one line for line (img/s aside)
    def lines(d):
        rows = [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows
                if r.get("event") not in ("data", "config")]
    assert lines("b") == lines("a")
    # the resumption's longer num_steps is recorded (config.json holds the settings in force; the change is
    # in metrics.jsonl), so a report sees the run's real end
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if r.get("event") == "config"] == [{"step": 3, "event": "config",
                                                                "changed": {"num_steps": [3, 6]}}]
    assert json.loads((tmp_path / "b" / "config.json").read_text())["num_steps"] == 6
    from resflax.analysis.runs import load_run  # noqa: PLC0415

    run = load_run(tmp_path / "b")
    assert run.num_steps == 6 and run.finished and run.progress == "finished"
    # TensorBoard: the events of both starts are readable; the resumption marks step 4 on as rewritten
    events = _tb_events(tmp_path / "b" / "tb")
    assert [s for s, tag, _ in events if tag == "train/loss"] == [1, 2, 3, 4, 5, 6]
    assert [s for s, tag, _ in events if tag == "purge"] == [4]
    assert dict(((s, t), v) for s, t, v in events)[(6, "test/error")] == pytest.approx(straight["test_error"])
    # each (re)start records the data it used
    data = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    data = [r for r in data if r.get("event") == "data"]
    assert [r["step"] for r in data] == [0, 3] and data[0]["train"] == data[0]["test"] == 64
    assert data[0]["data_dir"]
    assert sorted(int(p.name) for p in (tmp_path / "a" / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]


def _tb_events(logdir):
    """(step, tag, value) of every scalar in a TensorBoard dir, plus (step, "purge", 0) per restart marker;
    read with tensorboardX's own protocol buffers and CRC (an implementation independent of resflax's writer),
    checking every record's framing."""
    import struct  # noqa: PLC0415

    from tensorboardX.proto.event_pb2 import Event, SessionLog  # noqa: PLC0415
    from tensorboardX.record_writer import masked_crc32c  # noqa: PLC0415

    out = []
    for f in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data, i, first = f.read_bytes(), 0, True
        while i < len(data):
            header, (n,) = data[i:i + 8], struct.unpack("<Q", data[i:i + 8])
            payload = data[i + 12:i + 12 + n]
            assert struct.unpack("<I", data[i + 8:i + 12])[0] == masked_crc32c(header), f
            assert struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] == masked_crc32c(payload), f
            ev = Event.FromString(payload)
            assert ev.wall_time > 1.6e9 and (ev.file_version == "brain.Event:2") == first, ev
            first = False
            i += 16 + n
            if ev.HasField("session_log") and ev.session_log.status == SessionLog.START:
                out.append((ev.step, "purge", 0.0))
            out.extend((ev.step, v.tag, v.simple_value) for v in ev.summary.value)
    return out


def test_resume_is_bit_exact_with_scanned_stages(tmp_path):
    """A model whose stages run as a lax.scan keeps packed blocks in its state and checkpoints; resume is exact."""
    cfg = dict(model="resnet14", scan_min_blocks=2)  # 2 blocks per stage: block0 + packed block1-1
    with mock():
        straight = loop.train_and_evaluate(tiny_config(**cfg), str(tmp_path / "a"))
        loop.train_and_evaluate(tiny_config(num_steps=3, **cfg), str(tmp_path / "b"))
        resumed = loop.train_and_evaluate(tiny_config(**cfg), str(tmp_path / "b"))
        _, _, state = evaluate.restore(str(tmp_path / "b"), evaluate.load_config(str(tmp_path / "b")), num_devices=1)
    assert resumed["state_digest"] == straight["state_digest"] and resumed["step"] == 6
    assert resumed["test_error"] == straight["test_error"]
    assert "block1-1" in state.params["stage2"] and "block1" not in state.params["stage2"]
    with pytest.raises(ValueError, match="scan_min_blocks must be >= 0"):
        loop.plan(tiny_config(scan_min_blocks=-1))
    with mock():
        assert loop.plan(tiny_config(model="resnet14", scan_min_blocks=0)).model.scan_min_blocks is None


def _ckpt_steps(workdir):
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def test_divergence_guard(tmp_path):
    with mock():
        with pytest.raises(loop.DivergenceError, match=r"non-finite .* at step \d+; last good") as ei:
            loop.train_and_evaluate(tiny_config(base_lr=1e38, checkpoint_every_steps=1), str(tmp_path))
    bad = int(re.search(r"at step (\d+)", str(ei.value)).group(1))
    assert bad <= 3
    assert all(s < bad for s in _ckpt_steps(tmp_path))  # nothing at or after the bad step was saved


@pytest.mark.parametrize("poison_after,what,at", [(4, "loss", 5), (6, "parameters", 6)])
def test_divergence_keeps_the_earlier_good_checkpoint(tmp_path, monkeypatch, poison_after, what, at):
    """NaN parameters after step ``poison_after``: the loss at the next step (or the save at step 6) catches it;
    checkpoint 3 survives and restores (its digest is verified on restore)."""
    orig = loop.step_lib.make_train_step

    def poisoned(*a, **k):
        f = orig(*a, **k)

        def step(state, *args):
            state, m = f(state, *args)
            if int(state.step) == poison_after:
                state = state.replace(params=jax.tree_util.tree_map(lambda x: x * jax.numpy.nan, state.params))
            return state, m
        return step

    cfg = dict(num_steps=9, checkpoint_every_steps=3, log_every_steps=100, eval_every_steps=100)
    with mock():
        good = loop.train_and_evaluate(tiny_config(num_steps=3), str(tmp_path / "ref"))
        monkeypatch.setattr(loop.step_lib, "make_train_step", poisoned)
        with pytest.raises(loop.DivergenceError, match=rf"non-finite {what} at step {at};"):
            loop.train_and_evaluate(tiny_config(**cfg), str(tmp_path / "w"))
        assert _ckpt_steps(tmp_path / "w") == [3]
        _, _, state = evaluate.restore(tmp_path / "w")
    assert int(state.step) == 3 and state_lib.state_digest(state) == good["state_digest"]


def test_weight_decay_mask_reaches_the_stated_leaves():
    params = get_model("resnet8").init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 32, 32, 3)))["params"]
    flat = {jax.tree_util.keystr(p): v for p, v in
            jax.tree_util.tree_flatten_with_path(state_lib.weight_decay_mask(params, "kernels"))[0]}
    assert flat["['stage1']['block0']['conv1']['kernel']"] is True
    assert flat["['fc']['kernel']"] is True
    assert flat["['fc']['bias']"] is False and flat["['stage1']['block0']['bn1']['scale']"] is False
    assert all(jax.tree_util.tree_leaves(state_lib.weight_decay_mask(params, "all")))
    with pytest.raises(ValueError):
        state_lib.weight_decay_mask(params, "some")


def test_other_experiment_in_workdir_is_refused(tmp_path):
    with mock():
        loop.train_and_evaluate(tiny_config(num_steps=1), str(tmp_path))
        before = (tmp_path / "config.json").read_text()
        with pytest.raises(wd.WorkdirError, match="different experiment"):
            loop.train_and_evaluate(tiny_config(num_steps=1, seed=1), str(tmp_path))
        assert (tmp_path / "config.json").read_text() == before
        out = loop.train_and_evaluate(tiny_config(num_steps=1, seed=1), str(tmp_path), start_over=True)
    assert out["step"] == 1
    assert len(list(tmp_path.parent.glob(tmp_path.name + ".old-*"))) == 1  # the old run was moved, not lost


def test_workdir_in_use_is_refused(tmp_path):
    lock = wd.Lock(tmp_path)
    lock.acquire()
    try:
        with pytest.raises(wd.WorkdirError, match="in use"):
            wd.Lock(tmp_path).acquire()
    finally:
        lock.release()
    wd.Lock(tmp_path).acquire()  # released: usable again


def cli(*args, env=None, timeout=300):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "resflax.cli", *args], capture_output=True, text=True,
                          env=e, timeout=timeout, cwd=ROOT)


def test_cli_bad_input_one_line_nonzero_nothing_written(tmp_path):
    cfg = "--config=experiments/cifar10.py:resnet8"
    cases = [
        ([cfg.replace("resnet8", "resnet21")], "unknown model"),
        ([cfg, "--config.num_stepz=3"], "num_stepz"),
        ([cfg, "--config.batch_size=100"], "not divisible"),  # 100 % 3 devices
        ([cfg, "--config.data_dir=/nonexistent"], None),  # found via TFDS_DATA_DIR when set, else missing
    ]
    for args, msg in cases[:3]:
        w = tmp_path / "w"
        r = cli("train", *args, f"--workdir={w}",
                env={"XLA_FLAGS": "--xla_force_host_platform_device_count=3", "JAX_PLATFORMS": "cpu"})
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and msg in err[0], r.stderr[-1000:]  # one line, not a traceback
        assert not w.exists()


def test_cli_missing_data(tmp_path):
    """An explicit data_dir is the only place looked at; without one, $TFDS_DATA_DIR and ~/tensorflow_datasets."""
    env = {"TFDS_DATA_DIR": str(tmp_path / "nodata2"), "HOME": str(tmp_path)}
    r = cli("train", "--config=experiments/cifar10.py:resnet8", f"--workdir={tmp_path / 'w'}",
            f"--config.data_dir={tmp_path / 'nodata'}", env=env)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert f"not found in: {tmp_path / 'nodata'}." in last and "nodata2" not in last, last
    assert not (tmp_path / "w").exists()
    r = cli("train", "--config=experiments/cifar10.py:resnet8", f"--workdir={tmp_path / 'w'}", env=env)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "nodata2" in last and "tensorflow_datasets" in last, last
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
@needs_real
def test_resnet20_learns_on_real_cifar10(tmp_path, capfd):
    c = load_experiment().get_config("resnet20")
    # batch 64, not the paper's 128, for the suite's time: after 100 steps the loss is 1.84 (2.92 at step 10)
    # and the test error 70.4% (seed 0; chance is 90%) with the YNN flag on an AVX-512 machine; 77.8% on a
    # Sapphire Rapids machine without it (xla.YNN_UNSAFE_CPU): 100 steps are early enough in training that the
    # float rounding of the machine moves the test error by several points
    c.update(dict(num_steps=100, checkpoint_every_steps=100, log_every_steps=10, eval_every_steps=100,
                  progress=False, data_dir=REAL, batch_size=64))
    out = loop.train_and_evaluate(c, str(tmp_path))
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split") == "train"]
    assert train[0]["loss"] > 2.0 and train[-1]["loss"] < 0.8 * train[0]["loss"]
    assert out["test_error"] < 80.0  # chance is 90%
    tests = [r for r in rows if r.get("split") == "test"]
    assert [r["step"] for r in tests] == [100] and tests[0]["error"] == pytest.approx(out["test_error"])
    # resflax eval of the finished run, in-process (a subprocess would add its start-up to the suite)
    capfd.readouterr()
    assert resflax_cli.main(["eval", f"--workdir={tmp_path}", "--json"]) == 0
    ev = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert ev["step"] == 100 and ev["test_examples"] == 10_000
    assert ev["test_error"] == pytest.approx(out["test_error"]) and ev["state_digest"] == out["state_digest"]
