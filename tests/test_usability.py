"""What a new user trips on (issue 13): help that works, one name per knob, num_steps vs the schedule, float16,
honest messages on resumption and on a signal before the first step."""

import json
import os
import shutil
from pathlib import Path

import pytest
from test_schedules import load_experiment
from test_train import mock, tiny_config

from resflax import cli
from resflax.train import loop


def test_train_help_lists_every_config_key_and_exits_0(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    config = load_experiment().get_config("resnet20")
    for key in config.keys():
        if hasattr(config[key], "keys"):  # a group (population): each of its keys, with its comment
            for sub in config[key].keys():
                assert f"--config.{key}.{sub} " in out, (key, sub)
        else:
            assert f"--config.{key} " in out, key
    assert "0 = plain, 1 = residual" in out
    assert "--config.eval_every_steps" in out and "0 = once per epoch" in out  # the key's meaning of 0
    assert cli.main(["train", "--config=experiments/cifar10.py:resnet110", "-h"]) == 0
    assert "'resnet110'" in capsys.readouterr().out


def test_eval_help_describes_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    helps = {"--workdir": "run directory written by", "--data_dir": "TFDS data_dir holding cifar10",
             "--json": "print one JSON object"}
    flat = " ".join(out.split())
    for opt, text in helps.items():
        assert opt in flat and text in flat, opt
    assert flat.index("--workdir WORKDIR run directory") > 0  # the text stands beside its option


def test_one_name_per_knob():
    """The config argument's settings are named like the keys they set; the old short names are refused."""
    c = load_experiment().get_config("resnet56,seed=2,val_examples=5000,schedule_scale=0.5")
    assert (c.seed, c.val_examples, c.schedule_scale) == (2, 5000, 0.5)
    for old in ("val=5000", "scale=0.5"):
        with pytest.raises(ValueError, match="unknown config argument"):
            load_experiment().get_config(f"resnet56,{old}")


def test_num_steps_alone_stops_early_and_says_so(tmp_path, capsys):
    with mock():
        out = loop.train_and_evaluate(tiny_config(num_steps=3), str(tmp_path))
    printed = capsys.readouterr().out
    assert out["step"] == 3
    assert "the run stops at step 3, before the learning rate drops at 4, 5" in printed


def test_resume_on_another_device_count_is_stated(tmp_path, capsys, pristine):
    """A checkpoint written on 2 devices resumed on 1 with per-device BatchNorm: the run goes on, says what
    changes, and records it."""
    w = tmp_path / "run"
    shutil.copytree(pristine[0], w)
    shutil.rmtree(w / "checkpoints" / "6")
    meta = w / "checkpoints" / "3" / "meta" / "metadata"
    m = json.loads(meta.read_text())
    assert m["devices"] == 1 and m["processes"] == 1
    meta.write_text(json.dumps({**m, "devices": 2}))
    capsys.readouterr()
    with mock():
        out = loop.train_and_evaluate(tiny_config(), str(w))
    printed = capsys.readouterr().out
    assert out["step"] == 6
    assert "resumed on 1 devices, checkpoint 3 was written on 2" in printed
    assert "normalises over 16 images instead of 8" in printed
    rows = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if r.get("event") == "devices_changed"]
    assert len(ev) == 1 and ev[0]["from"] == 2 and ev[0]["to"] == 1 and ev[0]["step"] == 3


@pytest.fixture
def signalled(monkeypatch):
    """A SIGTERM/SIGINT that arrived before the first step (the loop's preemption flag set on entry)."""
    class Signalled(loop.Interrupts):  # the loop's only (the command line's own Interrupts saw nothing)
        def __enter__(self):
            super().__enter__()
            self.requested = True
            return self

    monkeypatch.setattr(loop, "Interrupts", Signalled)


def test_signal_before_the_first_step_claims_no_checkpoint(tmp_path, capsys, signalled):
    with mock():
        out = loop.train_and_evaluate(tiny_config(), str(tmp_path))
    printed = capsys.readouterr().out
    assert out["step"] == 0 and not out["finished"]
    assert "stopped by signal before the first step; nothing new to checkpoint (there is no checkpoint yet)" \
        in printed
    assert "checkpoint written" not in printed
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_a_run_made_before_mean_and_std_existed_still_resumes(tmp_path):
    """Configs gained `mean`/`std` (imported weights' normalisation); an older config.json without them, at
    their defaults, is the same experiment; with another value it is not."""
    import json  # noqa: PLC0415

    from resflax.errors import WorkdirError  # noqa: PLC0415
    from resflax.train import workdir as wd  # noqa: PLC0415

    old = {"model": "resnet20", "seed": 0, "num_steps": 64000}
    (tmp_path / "config.json").write_text(json.dumps(old))
    wd.check_experiment(tmp_path, {**old, "mean": "pixel", "std": None})
    with pytest.raises(WorkdirError, match="different experiment"):
        wd.check_experiment(tmp_path, {**old, "mean": "channel", "std": [0.229, 0.224, 0.225]})


def test_make_puts_data_where_the_user_says():
    """``DATA_DIR=DIR`` is where every make target reads and prepares data; the shared CIFAR-10 copy beside the
    checkout is only read, for CIFAR-10, and never becomes the place ImageNet is prepared in."""
    import subprocess  # noqa: PLC0415 (this test only)

    root = Path(__file__).resolve().parents[1]

    def dry(*args):
        env = {k: v for k, v in os.environ.items() if k not in ("TFDS_DATA_DIR", "DATA_DIR", "MAKEFLAGS")}
        return subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=root, env=env, capture_output=True,
                              text=True, check=True).stdout

    for target in ("imagenet-data", "imagenet-resnet50", "imagenet-resnet34-B", "demo", "cifar-resnet20", "data"):
        out = dry(target, "DATA_DIR=/data/tfds")
        assert "/data/tfds" in out, (target, out)
        assert "shared" not in out, (target, out)
    for target in ("imagenet-data", "imagenet-resnet50"):
        assert "shared" not in dry(target), target


def test_a_signal_is_reported_once(tmp_path, capsys, signalled):
    """``resflax train`` stopped by a signal says so in one line (the loop's), not twice."""
    with mock():
        rc = cli.main(["train", "--config=experiments/cifar10.py:resnet8", "--config.batch_size=16",
                       "--config.num_steps=6", "--config.progress=False", f"--workdir={tmp_path / 'w'}"])
    out = capsys.readouterr().out
    assert rc == 0
    assert [line for line in out.splitlines() if "rerun the same command" in line] == [
        "stopped by signal before the first step; nothing new to checkpoint (there is no checkpoint yet), rerun "
        "the same command to resume"], out
