"""ImageNet training through the shared loop (issue 10) on a tiny TFDS ArrayRecord dataset of real photographs
that the tests write: the ``:tiny`` config end to end, bit-exact resume after ``kill -9`` in the middle of an
epoch (with another loader worker count than the uninterrupted run), the plateau rule across a resumption,
bad input refused before anything is written, and the schedule pieces."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import run_helpers as rh

from resflax import cli
from resflax.train import schedules

ROOT = Path(__file__).resolve().parents[1]
# 64 training images (4 steps of 16 per epoch): checkpoints every 3 steps fall mid-epoch (0.75, 1.5, 2.25).
TINY = ["--config=experiments/imagenet.py:tiny", "--config.num_steps=12", "--config.lr_boundaries=(6,9)",
        "--config.checkpoint_every_steps=3", "--config.eval_every_steps=6", "--config.log_every_steps=1",
        "--config.progress=False"]


def _args(data: Path, cache: Path, *extra: str) -> list[str]:
    return [*TINY, f"--config.data_dir={data}", f"--config.mean_cache_dir={cache}", *extra]


def _start(workdir: Path, log: Path, e: dict, args: list[str]) -> subprocess.Popen:
    f = open(log, "a")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen([sys.executable, "-m", "resflax.cli", "train", *args, f"--workdir={workdir}"],
                            stdout=f, stderr=subprocess.STDOUT, env=e, cwd=ROOT)


def _meta(workdir: Path, step: int) -> dict:
    return json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """An uninterrupted ``:tiny`` run in one process with 2 devices and the loader in-process."""
    t = tmp_path_factory.mktemp("imagenet_ref")
    e = rh.env(rh.cache_dir(tmp_path_factory))
    rc = _start(t / "run", t / "log", e, _args(tiny_data, t / "cache", "--config.loader_workers=0")).wait(600)
    out = (t / "log").read_text()
    assert rc == 0, out[-3000:]
    return rh.digest(t / "log"), t / "run", out


@pytest.mark.slow
def test_tiny_imagenet_trains_end_to_end(reference):
    digest, w, out = reference
    assert digest, out[-2000:]
    assert "resflax_tiny_jpeg" in out and "64 train / 16 validation" in out, out[:2000]
    rows = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split") == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert all(np.isfinite(r["loss"]) for r in train)
    # the fixed schedule: 0.1, then /10 from step 6 (the lr of step s is the one step s used: state.step = s-1)
    lrs = {r["step"]: r["lr"] for r in train}
    assert lrs[6] == pytest.approx(0.1) and lrs[7] == pytest.approx(0.01) and lrs[10] == pytest.approx(0.001)
    tests = [r for r in rows if r.get("split") == "test"]
    assert [r["step"] for r in tests] == [6, 12]
    assert all(0 <= r["top5_error"] <= r["error"] <= 100 for r in tests)
    data = next(r for r in rows if r.get("event") == "data")
    assert data["train"] == 64 and data["test"] == 16 and data["mean"] == "pixel"
    # the input's position is saved in the same Orbax checkpoint as the state
    for step in (6, 9, 12):
        rec = _meta(w, step)["input"]
        assert rec["kind"] == "stream" and rec["step"] == step and rec["num_examples"] == 64
        assert rec["global_batch"] == 16 and rec["seed"] == 0
    # and resflax eval reads the run like any other: the same test error, with top-5
    ev = subprocess.run([sys.executable, "-m", "resflax.cli", "eval", f"--workdir={w}", "--json"],
                        capture_output=True, text=True, env=rh.env(Path(w).parent / "cache"), cwd=ROOT, timeout=300)
    assert ev.returncode == 0, ev.stderr[-2000:]
    res = json.loads(ev.stdout.strip().splitlines()[-1])
    assert res["step"] == 12 and res["test_examples"] == 16
    assert res["test_error"] == pytest.approx(tests[-1]["error"]) and "test_top5_error" in res
    assert res["state_digest"].startswith(digest)


@pytest.mark.slow
def test_eval_protocols_through_the_cli(reference, tmp_path):
    """resflax eval --protocol 10crop --record on the tiny run: one JSON line, appended to metrics.jsonl (the
    run's copy). (multiscale goes through the same command; tests/test_protocols.py checks both protocols.)"""
    import shutil  # noqa: PLC0415

    w = tmp_path / "run"
    shutil.copytree(reference[1], w)
    for protocol in ("10crop",):
        ev = subprocess.run([sys.executable, "-m", "resflax.cli", "eval", f"--workdir={w}", "--json", "--record",
                             f"--protocol={protocol}"], capture_output=True, text=True, env=rh.env(tmp_path / "cc"),
                            cwd=ROOT, timeout=300)
        assert ev.returncode == 0, ev.stderr[-2000:]
        res = json.loads(ev.stdout.strip().splitlines()[-1])
        assert res["protocol"] == protocol and res["test_examples"] == 16 and res["step"] == 12
        last = json.loads((w / "metrics.jsonl").read_text().splitlines()[-1])
        assert last == {"step": 12, "event": "eval", "protocol": protocol, "error": res["test_error"],
                        "top5_error": res["test_top5_error"], "count": 16}


@pytest.mark.slow
def test_kill9_mid_epoch_resumes_bit_exactly_with_another_worker_count(reference, tiny_data, tmp_path,
                                                                        tmp_path_factory):
    """Killed after the mid-epoch checkpoint of step 6 (epoch 1.5), rerun: the same final digest and the same
    metrics as the uninterrupted run, though these runs use 2 grain worker processes and it used none."""
    ref_digest, ref_dir, _ = reference
    e = rh.env(rh.cache_dir(tmp_path_factory))
    w, log = tmp_path / "run", tmp_path / "log"
    args = _args(tiny_data, tmp_path / "cache", "--config.loader_workers=2")
    p = _start(w, log, e, args)
    t0 = time.time()
    while not (w / "checkpoints" / "6").exists() or rh.train_step(w) < 7:
        assert p.poll() is None, log.read_text()[-3000:]
        assert time.time() - t0 < 600, log.read_text()[-3000:]
        time.sleep(0.05)
    rh.kill9(p)
    killed_at = rh.train_step(w)
    assert killed_at < 12, "the run finished before it could be killed"
    rc = _start(w, log, e, args).wait(600)
    out = log.read_text()
    assert rc == 0, out[-3000:]
    assert "resumed from step 6" in out or "resumed from step 9" in out, out[-3000:]
    assert rh.digest(log) == ref_digest, out[-3000:]
    assert rh.metrics(w) == rh.metrics(ref_dir)


@pytest.mark.slow
def test_two_processes_reading_their_own_shards_match_one(reference, tiny_data, tmp_path, tmp_path_factory):
    """2 processes of 1 device each (gloo), each decoding only its half of every global batch: the same final
    digest and metrics as 1 process with 2 devices."""
    ref_digest, ref_dir, _ = reference
    cc, w, port = rh.cache_dir(tmp_path_factory), tmp_path / "run", rh.free_port()
    procs = [_start(w, tmp_path / f"p{i}.log",
                    rh.env(cc, devices=1, RESFLAX_COORDINATOR=f"127.0.0.1:{port}", RESFLAX_NUM_PROCESSES=2,
                           RESFLAX_PROCESS_ID=i),
                    _args(tiny_data, tmp_path / "cache", "--config.loader_workers=0"))
             for i in range(2)]
    rcs = [p.wait(timeout=600) for p in procs]
    logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
    assert rcs == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert rh.digest(tmp_path / "p0.log") == rh.digest(tmp_path / "p1.log") == ref_digest
    assert rh.metrics(w) == rh.metrics(ref_dir)


@pytest.mark.slow
def test_plateau_rule_drops_the_lr_and_survives_a_resumption(tiny_data, tmp_path, tmp_path_factory):
    """lr_schedule=plateau with 8 held-out images, patience 1 and an improvement nobody reaches: every
    evaluation after the first (steps 4 and 6) divides the lr. The run is stopped at step 4 and resumed to
    step 6 (num_steps is resumable): the resumed steps use the dropped lr, because the rule's state travels in
    the checkpoint."""
    e = rh.env(rh.cache_dir(tmp_path_factory))
    w, log = tmp_path / "run", tmp_path / "log"
    base = _args(tiny_data, tmp_path / "cache", "--config.lr_schedule=plateau", "--config.val_examples=8",
                 "--config.plateau_patience=1", "--config.plateau_min_delta=1000.0", "--config.eval_every_steps=2",
                 "--config.checkpoint_every_steps=2")
    assert _start(w, log, e, [*base, "--config.num_steps=4"]).wait(600) == 0, log.read_text()[-3000:]
    rec = _meta(w, 4)["lr"]["plateau"]
    assert rec["drops"] == [4] and rec["bad"] == 0
    assert _start(w, log, e, [*base, "--config.num_steps=6"]).wait(600) == 0, log.read_text()[-3000:]
    out = log.read_text()
    assert "lr divided by 10 from step 4" in out and "56 train / 16 validation / 8 held out" in out, out[-3000:]
    rows = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if r.get("split") == "train"}
    assert lrs[4] == pytest.approx(0.1) and lrs[5] == pytest.approx(0.01) and lrs[6] == pytest.approx(0.01)
    # step 6's evaluation does not improve on step 4's by 1000 points either: a second drop, for step 7 on
    assert [r["step"] for r in rows if r.get("event") == "lr_drop"] == [4, 6]
    assert _meta(w, 6)["lr"]["plateau"]["drops"] == [4, 6]
    assert {r["split"] for r in rows if "split" in r} == {"train", "test", "val"}


def test_bad_input_is_refused_before_anything_is_written(tiny_data, tmp_path, capsys):
    w = tmp_path / "run"
    cases = [
        ("--config.model=resnet20", "is a CIFAR model"),
        ("--config.lr_schedule=cosine", "lr_schedule must be"),
        ("--config.lr_schedule=plateau", "set val_examples"),
        ("--config.crop=center", "crop must be"),
        ("--config.scale_range=(64,240)", "scale_range"),
        ("--config.val_examples=64", "val_examples must be in (0, 64)"),
        ("--config.loader_workers=-2", "loader_workers"),
        ("--config.dataset=no_such_dataset", "not found"),
    ]
    for arg, words in cases:
        rc = cli.main(["train", *_args(tiny_data, tmp_path / "cache", arg), f"--workdir={w}"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and words in err and len(err.splitlines()) == 1, (arg, err)
        assert not w.exists(), arg


def test_schedule_pieces():
    # the fixed schedule with a gradual warm-up: a ramp to the peak, then the drops
    lr = [float(schedules.linear_warmup_lr(s, 0.4, (10, 20), 0.1, 4)) for s in (0, 1, 3, 4, 9, 10, 20)]
    assert lr == pytest.approx([0.1, 0.2, 0.4, 0.4, 0.4, 0.04, 0.004])
    assert float(schedules.linear_warmup_lr(0, 0.1, (), 0.1, 0)) == pytest.approx(0.1)
    # the plateau rule
    p = schedules.Plateau(patience=2, min_delta=0.5, factor=0.1, max_drops=2)
    decisions = [p.update(e, s) for s, e in enumerate([50.0, 40.0, 39.8, 39.9, 39.0, 39.0, 39.0, 38.0, 38.0,
                                                       38.0, 38.0, 38.0], start=1)]
    assert [s for s, d in enumerate(decisions, start=1) if d] == [4, 7]  # at most max_drops
    assert p.drops == [4, 7] and p.scale() == pytest.approx(0.01)
    q = schedules.Plateau(2, 0.5, 0.1, 2)
    q.load(json.loads(json.dumps(p.state())))
    assert q.state() == p.state()


def _imagenet_config(arg: str):
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("imagenet_exp", ROOT / "experiments" / "imagenet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def test_configs_of_the_paper_tables():
    for name, shortcut in [("plain18", "A"), ("plain34", "A"), ("resnet18", "A"), ("resnet34", "A"),
                           ("resnet50", "B"), ("resnet101", "B"), ("resnet152", "B")]:
        c = _imagenet_config(name)
        assert (c.model, c.shortcut, c.batch_size, c.num_steps) == (name, shortcut, 256, 600_000)
        assert c.lr_boundaries == (150_000, 300_000, 450_000) and c.weight_decay == 1e-4 and c.momentum == 0.9
        assert (c.crop, tuple(c.scale_range), c.lighting_std, c.mean) == ("scale", (256, 480), 0.1, "pixel")
        assert not c.stride_on_3x3 and schedules.peak_lr(c) == pytest.approx(0.1)
    assert _imagenet_config("resnet34,shortcut=C").shortcut == "C"
    c = _imagenet_config("resnet50")
    c.lr_scaling, c.batch_size = "linear", 1024
    assert schedules.peak_lr(c) == pytest.approx(0.4)

