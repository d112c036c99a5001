"""The read-only commands (eval, responses, report, export, predict) write nothing in the workdirs they read, on
every path: an internal error's traceback goes to stderr and to a log in the user's cache folder, never to
WORKDIR/errors.log. The failures a user can cause are exit 2 with one line in resflax's words."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_restore import _cli

from resflax import cli, configs, weights
from resflax.analysis import report, responses
from resflax.train import tasks, transfer


def disk_state(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (itself included): kind, size, mtime in ns and, for files, the sha256 of
    the contents. Equal before and after means nothing was created, removed, changed or touched."""
    out = {}
    for p in [root, *sorted(root.rglob("*"))]:
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_size, st.st_mtime_ns, digest)
    return out


def _error_logs() -> set[Path]:
    """The internal-error logs in the user's cache folder (the README's rule, spelt out here)."""
    d = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "resflax" / "errors"
    return set(d.iterdir()) if d.is_dir() else set()


@pytest.fixture
def run(pristine, tmp_path):
    """A copy of the finished tiny run, and a PNG image outside it."""
    w = tmp_path / "run"
    shutil.copytree(pristine[0], w)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), np.uint8)).save(tmp_path / "img.png")
    return w


def _boom(*a, **k):
    raise RuntimeError("injected fault")


# command -> (the module and name of something the command calls after it opened the run, argv)
FAULTS = {
    "eval": (tasks.CifarTask, "close", lambda w, t: ["eval", f"--workdir={w}"]),  # after the test set was evaluated
    "responses": (responses, "response_stds", lambda w, t: ["responses", "--workdir", str(w), "--max_images", "8"]),
    "report": (report, "table6_markdown", lambda w, t: ["report", str(w), "--out", str(t / "report")]),
    "export": (weights, "check_variant", lambda w, t: ["export", f"--workdir={w}", f"--out={t / 'w.safetensors'}"]),
    "predict": (transfer, "class_names", lambda w, t: ["predict", f"--workdir={w}", str(t / "img.png")]),
}


@pytest.mark.parametrize("command", list(FAULTS))
def test_an_internal_error_writes_nothing_in_the_workdir(command, run, tmp_path, capsys, monkeypatch):
    module, name, argv = FAULTS[command]
    monkeypatch.setattr(module, name, _boom)
    before, logs_before = disk_state(run), _error_logs()
    rc, out, err = _cli(argv(run, tmp_path), capsys)
    assert rc == 1, err
    assert disk_state(run) == before  # names, sizes, contents and mtimes: no errors.log, nothing else either
    assert "Traceback (most recent call last)" in err[0] and "injected fault" in "\n".join(err)
    assert err[-1].startswith("resflax: internal error: RuntimeError: injected fault"), err[-1]
    new = _error_logs() - logs_before
    assert len(new) == 1, new
    log = new.pop()
    assert f"traceback also in {log})" in err[-1] and f"-{command}-" in log.name
    text = log.read_text()
    assert f"resflax {command} " in text and "Traceback" in text and "injected fault" in text
    assert not (tmp_path / "w.safetensors").exists()


def test_an_unwritable_cache_folder_only_loses_the_log(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tasks.CifarTask, "close", _boom)
    (tmp_path / "not_a_folder").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not_a_folder"))
    before = disk_state(run)
    rc, out, err = _cli(["eval", f"--workdir={run}"], capsys)
    assert rc == 1 and disk_state(run) == before
    assert err[-1].startswith("resflax: internal error: RuntimeError") and "traceback also in" not in err[-1]


def test_train_still_keeps_its_traceback_in_the_workdir(tmp_path, capsys, monkeypatch):
    """(test_restore's internal-error test covers a run that got as far as its training step.)"""
    monkeypatch.setattr(cli, "_commands", lambda area: type("M", (), {"run_train": staticmethod(_boom)}))
    w = tmp_path / "run"
    w.mkdir()
    rc, out, err = _cli(["train", "--config=experiments/cifar10.py:resnet8", f"--workdir={w}"], capsys)
    assert rc == 1 and f"traceback also in {w / 'errors.log'}" in err[-1]
    assert "injected fault" in (w / "errors.log").read_text()


def _one_line_exit_2(argv, capsys, *roots: Path) -> str:
    states, logs = [disk_state(r) for r in roots], _error_logs()
    rc, out, err = _cli(argv, capsys)
    assert rc == 2 and len(err) == 1, err
    assert [disk_state(r) for r in roots] == states and _error_logs() == logs
    assert err[0].startswith("resflax: error: "), err
    return err[0]


def test_export_to_a_missing_folder_or_a_folder_is_one_line(run, tmp_path, capsys):
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "pad_layout": "split"}))  # exportable in akamaster's names
    assert cli.main(["export", f"--workdir={run}", f"--out={tmp_path / 'ok.safetensors'}"]) == 0
    out = tmp_path / "missing_folder" / "x.safetensors"
    line = _one_line_exit_2(["export", f"--workdir={run}", f"--out={out}"], capsys, run, tmp_path)
    assert str(out) in line and "missing_folder" in line, line
    (tmp_path / "taken.safetensors").mkdir()  # a file that cannot be written whoever runs this (root too)
    out = tmp_path / "taken.safetensors"
    line = _one_line_exit_2(["export", f"--workdir={run}", f"--out={out}"], capsys, run, tmp_path)
    assert str(out) in line, line


def test_export_and_predict_without_a_checkpoint_say_so(run, tmp_path, capsys):
    shutil.rmtree(run / "checkpoints")
    line = _one_line_exit_2(["export", f"--workdir={run}", f"--out={tmp_path / 'x.safetensors'}"], capsys, run)
    assert line == f"resflax: error: {run} has no checkpoint to export"
    line = _one_line_exit_2(["predict", f"--workdir={run}", str(tmp_path / "img.png")], capsys, run)
    assert line == f"resflax: error: {run} has no checkpoint to predict with"
    assert not (tmp_path / "x.safetensors").exists()


def test_predict_on_a_file_that_is_not_an_image_names_the_file(run, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture\n")
    line = _one_line_exit_2(["predict", f"--workdir={run}", str(notes)], capsys, run)
    assert line == f"resflax: error: {notes} is not an image Pillow can read", line
    assert not re.search(r"0x[0-9a-f]+|BytesIO", line)


def test_the_user_cache_folder_rule(monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "/x/cache")
    assert configs.user_cache_dir() == Path("/x/cache/resflax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert configs.user_cache_dir() == Path(os.path.expanduser("~/.cache/resflax"))


# `resflax ARGV` in a fresh process whose transfer.class_names (called by predict after the checkpoint was read)
# first sends this process a SIGTERM: what a scheduler or `kill` does to a running command
TERMINATED = ("import os, signal, sys\nfrom resflax import cli\nfrom resflax.train import transfer\n"
              "names = transfer.class_names\n"
              "def class_names(*a, **k):\n    os.kill(os.getpid(), signal.SIGTERM)\n    return names(*a, **k)\n"
              "transfer.class_names = class_names\nsys.exit(cli.main(sys.argv[1:]))\n")


def test_sigterm_ends_a_command_as_an_interrupt(run, tmp_path):
    """SIGTERM is taken as SIGINT is (one line, exit 130), not Python's default death by signal (exit -15, no
    word); the workdir is untouched."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    before = disk_state(run)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("TFDS_DATA_DIR", None)
    p = subprocess.run([sys.executable, "-c", TERMINATED, "predict", f"--workdir={run}", str(tmp_path / "img.png")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 130, (p.returncode, p.stderr[-2000:])
    assert p.stderr.strip().splitlines()[-1] == "resflax: error: interrupted" and "Traceback" not in p.stderr
    assert disk_state(run) == before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_interrupt_python_drops_still_ends_a_reader(run, tmp_path, capsys, monkeypatch):
    """A Ctrl-C whose KeyboardInterrupt Python drops (raised in a garbage-collection callback: "Exception ignored")
    no longer lets the command finish and exit 0: it ends as interrupted (130), and export writes nothing."""
    import gc  # noqa: PLC0415
    import signal  # noqa: PLC0415

    def callback(phase, info):
        gc.callbacks.remove(callback)
        signal.raise_signal(signal.SIGINT)
        sum(range(1000))  # the handler runs at the next bytecode: inside this callback

    real = transfer.evaluate.restore

    def restore_then_collect(*a, **k):
        out = real(*a, **k)
        gc.callbacks.append(callback)
        gc.collect()
        return out

    monkeypatch.setattr(transfer.evaluate, "restore", restore_then_collect)
    monkeypatch.setattr(weights, "check_variant", lambda *a, **k: None)  # this run's layout is not akamaster's
    out = tmp_path / "w.safetensors"
    for argv in (["predict", f"--workdir={run}", str(tmp_path / "img.png")],
                 ["export", f"--workdir={run}", f"--out={out}"]):
        rc, _, err = _cli(argv, capsys)
        assert rc == 130 and err[-1] == "resflax: error: interrupted", (argv[0], rc, err)
        assert not any("Exception ignored" in line for line in err), err
    assert not out.exists()


def test_export_replaces_a_file_only_when_the_new_one_is_whole(run, tmp_path, capsys, monkeypatch):
    """export writes beside --out and renames: stopped while writing, the file that was there is intact and no
    temporary file is left; done, the new file has the permissions any new file gets (umask), not 0600."""
    from resflax.data import files  # noqa: PLC0415

    monkeypatch.setattr(weights, "check_variant", lambda *a, **k: None)  # this run's layout is not akamaster's
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"the user's earlier export")
    real = files.os.replace

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", stopped)
    rc, _, err = _cli(["export", f"--workdir={run}", f"--out={out}"], capsys)
    assert rc == 130 and out.read_bytes() == b"the user's earlier export", (rc, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png", "run", "w.safetensors"]
    monkeypatch.setattr(files.os, "replace", real)
    rc, _, err = _cli(["export", f"--workdir={run}", f"--out={out}"], capsys)
    assert rc == 0, err
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == (0o666 & ~umask) and len(weights.read_state_dict(out)) > 0
