"""``resflax eval`` on a run trained on TFDS mock data, with no TFDS_DATA_DIR (no ../shared, no real data)."""

import json
import logging
import os
import re
import subprocess
import sys

import pytest
from test_train import _ckpt_steps, mock, tiny_config

from resflax import cli
from resflax.train import loop

# 64 mock test images in batches of 24: two full batches and a padded, masked one of 16
EVAL_BATCH = 24


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 6-step ResNet-8 run (checkpoints at 3 and 6) and its train_and_evaluate result."""
    mp = pytest.MonkeyPatch()
    mp.delenv("TFDS_DATA_DIR", raising=False)
    mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))  # ~/tensorflow_datasets: empty
    w = tmp_path_factory.mktemp("run") / "w"
    try:
        with mock():
            result = loop.train_and_evaluate(tiny_config(eval_batch_size=EVAL_BATCH), str(w))
    finally:
        mp.undo()
    return w, result


@pytest.fixture
def no_data(monkeypatch, tmp_path):
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _eval(capfd, *args):
    capfd.readouterr()  # drop anything printed before
    with mock():
        rc = cli.main(["eval", *args])
    out, err = capfd.readouterr()
    return rc, out, err


def test_eval_json_reports_the_last_checkpoint(trained, capfd, no_data):
    w, result = trained
    assert result["finished"] and result["step"] == 6 and result["test_error"] is not None
    assert _ckpt_steps(w) == [3, 6]
    rc, out, _ = _eval(capfd, "--workdir", str(w), "--json")
    assert rc == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    r = json.loads(lines[0])
    assert r["step"] == _ckpt_steps(w)[-1] == result["step"]
    assert r["test_examples"] == 64  # every mock test image once (last batch padded and masked)
    assert r["state_digest"] == result["state_digest"]
    assert r["test_error"] == result["test_error"]  # same state, same batches: bit-identical
    assert r["model"] == "resnet8" and r["workdir"] == str(w)
    assert 0.0 <= r["test_error"] <= 100.0 and r["test_error"] * 64 / 100 == pytest.approx(
        round(r["test_error"] * 64 / 100), abs=1e-6)  # a whole number of the 64 images
    assert r["test_loss"] > 0 and r["skipped_damaged"] == []


def test_eval_human_readable_is_one_line_with_the_same_numbers(trained, capfd, no_data):
    w, result = trained
    rc, out, _ = _eval(capfd, "--workdir", str(w))
    assert rc == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    m = re.fullmatch(r"resnet8 step (\d+): test error ([\d.]+)% on (\d+) images \(state_digest ([0-9a-f]{64})\)",
                     lines[0])
    assert m, lines[0]
    assert int(m.group(1)) == result["step"] == 6
    assert m.group(2) == f"{result['test_error']:.2f}"
    assert int(m.group(3)) == 64
    assert m.group(4) == result["state_digest"]


def test_eval_without_a_run_exits_2_with_one_line(tmp_path, capfd, no_data):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out, err = _eval(capfd, "--workdir", str(empty))
    assert rc == 2 and out == ""
    assert err.splitlines() == [f"resflax: error: {empty} holds no run (no config.json)"]
    # the installed entry point as a process: exit status 2, the same single line on stderr, nothing on stdout
    env = {k: v for k, v in os.environ.items() if k != "TFDS_DATA_DIR"}
    p = subprocess.run([sys.executable, "-m", "resflax.cli", "eval", "--workdir", str(empty)], capture_output=True,
                       text=True, timeout=300, env=dict(env, JAX_PLATFORMS="cpu", HOME=str(tmp_path / "home")))
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == [f"resflax: error: {empty} holds no run (no config.json)"]


def test_eval_without_a_checkpoint_exits_2_with_one_line(trained, tmp_path, capfd, no_data):
    w, _ = trained
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((w / "config.json").read_text())
    rc, out, err = _eval(capfd, "--workdir", str(bare))
    assert rc == 2 and out == ""
    assert err.splitlines() == [f"resflax: error: {bare} has no checkpoint to evaluate"]


def test_eval_without_a_checkpoint_logs_no_warning(trained, tmp_path, capfd, caplog, no_data):
    """The same case as above: in a process every WARNING log record is a stderr line (pytest captures them
    here), so none may come with the one-line error (the TFDS mock's own about its fake dir aside)."""
    w, _ = trained
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((w / "config.json").read_text())
    with caplog.at_level(logging.WARNING):
        rc, _, _ = _eval(capfd, "--workdir", str(bare))
    assert rc == 2
    extra = [r.getMessage() for r in caplog.records
             if r.levelno >= logging.WARNING and "non-existing/tfds" not in r.getMessage()]
    assert extra == []


def test_eval_protocols_and_record_on_cifar(trained, capfd, no_data):
    w, _ = trained
    before = (w / "metrics.jsonl").read_text()
    rc, out, err = _eval(capfd, "--workdir", str(w), "--protocol", "10crop")
    assert rc == 2 and "for ImageNet-style runs" in err and len(err.strip().splitlines()) == 1
    assert (w / "metrics.jsonl").read_text() == before  # nothing written without --record
    rc, out, _ = _eval(capfd, "--workdir", str(w), "--record", "--json")
    r = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and r["protocol"] == "center"
    after = (w / "metrics.jsonl").read_text()
    assert after.startswith(before)
    line = json.loads(after[len(before):])
    assert line == {"step": 6, "event": "eval", "protocol": "center", "error": r["test_error"], "top5_error": None,
                    "count": 64}
