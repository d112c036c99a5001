"""Only damage is treated as damage (issue 13): a restore that fails for any other reason stops the run with
exit 2 and leaves every checkpoint where it was; read-only commands never change a workdir; every failure to
write is exit 2 in one line; an unexpected exception is an internal error (exit 1), never "bad input"."""

import errno
import json
import shutil

import jax
import orbax.checkpoint as ocp
import pytest
from conftest import damage, tree_snapshot
from test_train import _ckpt_steps, mock

from resflax import cli
from resflax.errors import RestoreError
from resflax.train import checkpoint, loop
from resflax.train import workdir as wd

TRAIN = ["train", "--config=experiments/cifar10.py:resnet8", "--config.batch_size=16", "--config.eval_batch_size=32",
         "--config.num_steps=6", "--config.lr_boundaries=(4,5)", "--config.checkpoint_every_steps=3",
         "--config.log_every_steps=1", "--config.eval_every_steps=3", "--config.progress=False"]


def _copy(pristine, tmp_path):
    w = tmp_path / "run"
    shutil.copytree(pristine[0], w)
    return w


def _cli(argv, capsys):
    capsys.readouterr()
    with mock():
        rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, [ln for ln in err.strip().splitlines() if ln]


def _renamed_fc(orig):
    """init_state of a later 'version' whose head is called ``head`` instead of ``fc``."""
    def init_state(*a, **k):
        s = orig(*a, **k)
        params = dict(s.params)
        params["head"] = params.pop("fc")
        return s.replace(params=params)
    return init_state


RESTORE_FAILURES = {
    "out of memory": lambda: jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1.2GiB"),
    "host memory": lambda: MemoryError(),
    "I/O error": lambda: OSError(errno.EIO, "Input/output error", "checkpoints/6/state/d/x"),
    "file system unavailable": lambda: ValueError("UNAVAILABLE: Error reading local file: connection lost"),
    "device error": lambda: jax.errors.JaxRuntimeError("INTERNAL: CUDA error: an illegal memory access"),
    "unknown": lambda: RuntimeError("something nobody foresaw"),
}


@pytest.mark.parametrize("kind", list(RESTORE_FAILURES))
def test_restore_failure_that_is_not_damage_moves_nothing(tmp_path, pristine, capsys, monkeypatch, kind):
    """An allocation failure, a device error or an I/O error while restoring is not damage: exit 2 in one line
    naming the checkpoint, every file of the workdir byte-identical, no checkpoints_damaged/."""
    w = _copy(pristine, tmp_path)
    before = tree_snapshot(w)

    def failing_restore(self, *a, **k):
        raise RESTORE_FAILURES[kind]()

    monkeypatch.setattr(ocp.CheckpointManager, "restore", failing_restore)
    rc, out, err = _cli([*TRAIN, f"--workdir={w}"], capsys)
    assert rc == 2 and len(err) == 1, err
    assert "cannot restore checkpoint 6" in err[0] and "nothing was moved" in err[0], err
    assert "WARNING" not in out and "resumed" not in out
    assert tree_snapshot(w) == before and not (w / "checkpoints_damaged").exists()
    assert checkpoint.classify_restore_error(RESTORE_FAILURES[kind]()) != "damage"


def test_restore_target_tree_changed_is_refused_not_set_aside(tmp_path, pristine, capsys, monkeypatch):
    """Parameter names changed by an upgrade: the checkpoints are intact, so nothing is moved and the run stops
    with a message naming what differs."""
    w = _copy(pristine, tmp_path)
    before = tree_snapshot(w)
    monkeypatch.setattr(loop.state_lib, "init_state", _renamed_fc(loop.state_lib.init_state))
    rc, out, err = _cli([*TRAIN, f"--workdir={w}"], capsys)
    assert rc == 2 and len(err) == 1, err
    assert "checkpoint 6 holds another state tree" in err[0] and "params/head" in err[0], err
    assert tree_snapshot(w) == before and not (w / "checkpoints_damaged").exists()


def test_damage_classification():
    assert checkpoint.classify_restore_error(json.JSONDecodeError("x", "", 0)) == "damage"
    assert checkpoint.classify_restore_error(FileNotFoundError(2, "gone")) == "damage"
    assert checkpoint.classify_restore_error(
        ValueError('FAILED_PRECONDITION: Error reading "params.x": ZSTD_decompressStream() failed')) == "damage"
    assert checkpoint.classify_restore_error(ValueError("DATA_LOSS: checksum mismatch")) == "damage"
    assert checkpoint.classify_restore_error(checkpoint.Damaged("digest")) == "damage"
    # the machine wins when both appear in the chain: an I/O error that made a read fail is not damage
    try:
        try:
            raise OSError(errno.EIO, "Input/output error")
        except OSError as io:
            raise ValueError("DATA_LOSS: short read") from io
    except ValueError as e:
        assert checkpoint.classify_restore_error(e) == "io"


@pytest.mark.parametrize("how", ["garbage", "meta", "truncate", "optimizer"])
def test_eval_skips_damage_read_only_and_train_still_handles_it(tmp_path, pristine, capsys, how):
    """eval on a workdir whose newest checkpoint is damaged, while a training run holds the workdir and an
    Orbax temporary directory (a save in progress) is present: it evaluates checkpoint 3, says it skipped 6,
    and changes nothing. A later train still finds 6 damaged, sets it aside and ends with the same digest.

    A reader reads only the network's variables (checked against the state digest written with them): damage
    outside them ("optimizer": the whole state's digest no longer matches, the variables' still does) does not
    stop it, and it evaluates 6 with the run's digest; training, which restores the whole state, sets 6 aside.
    Where "garbage" (256 bytes in the middle of the largest file) lands depends on Orbax's file layout: either
    6 is skipped, or its variables were untouched and it is evaluated with the run's digest."""
    src, want = pristine
    w = _copy(pristine, tmp_path)
    if how == "optimizer":
        meta = w / "checkpoints" / "6" / "meta" / "metadata"
        m = json.loads(meta.read_text())
        m["tree_digest"] = "0" * 64
        meta.write_text(json.dumps(m))
    else:
        damage(w / "checkpoints" / "6", how)
    in_progress = w / "checkpoints" / "9.orbax-checkpoint-tmp-1234567890"
    shutil.copytree(w / "checkpoints" / "3", in_progress)
    before = tree_snapshot(w)
    lock = wd.Lock(w)
    lock.acquire()  # "a training run holds the workdir"
    try:
        rc, out, err = _cli(["eval", f"--workdir={w}", "--json"], capsys)
    finally:
        lock.release()
    assert rc == 0, err
    lines = out.strip().splitlines()
    warnings = [ln for ln in lines if ln.startswith("WARNING")]
    r = json.loads(lines[-1])
    if how == "optimizer" or (how == "garbage" and r["step"] == 6):
        assert not warnings and r["skipped_damaged"] == [] and r["state_digest"] == want, (warnings, r)
    else:
        assert len(warnings) == 1 and "checkpoint 6 is damaged" in warnings[0] and "left in place" in warnings[0]
        assert r["step"] == 3 and r["skipped_damaged"] == [6]
    assert r["test_examples"] == 64
    assert tree_snapshot(w) == before and not (w / "checkpoints_damaged").exists()
    # responses is read-only too
    rc, out, err = _cli(["responses", "--workdir", str(w), "--out", str(tmp_path / "out"), "--max_images", "8"],
                        capsys)
    assert rc == 0, err
    assert tree_snapshot(w) == before
    shutil.rmtree(in_progress)
    rc, out, err = _cli([*TRAIN, f"--workdir={w}"], capsys)
    assert rc == 0, err
    assert "checkpoint 6 is damaged" in out and "moved to" in out and "resumed from step 3" in out
    assert f"state_digest {want[:16]}" in out and _ckpt_steps(w) == [3, 6]
    assert [p.name.split("-")[0] for p in (w / "checkpoints_damaged").iterdir()] == ["6"]


def test_read_only_checkpointer_refuses_to_save(tmp_path, pristine):
    w = _copy(pristine, tmp_path)
    ck = checkpoint.Checkpointer(w, read_only=True)
    try:
        with pytest.raises(RuntimeError, match="read-only"):
            ck.save(7, {}, {})
    finally:
        ck.close()
    with pytest.raises(RestoreError):
        raise RestoreError("x")  # exported where the loop and the CLI look for it


# ---- exit codes: every failure to write is exit 2 in one line; anything unexpected is an internal error


def _enospc_open(target_name, mode_prefix):
    real = open

    def fake(path, mode="r", *a, **k):
        if str(path).endswith(target_name) and mode.startswith(mode_prefix):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, mode, *a, **k)
    return fake


@pytest.mark.parametrize("what", ["metrics.jsonl", "config.json", "tensorboard"])
def test_failure_to_write_is_exit_2_one_line(tmp_path, capsys, monkeypatch, what):
    w = tmp_path / "run"
    if what == "metrics.jsonl":
        monkeypatch.setattr(wd, "open", _enospc_open("metrics.jsonl", "a"), raising=False)
    elif what == "config.json":
        monkeypatch.setattr(wd, "open", _enospc_open("config.json.tmp", "w"), raising=False)
    else:
        from resflax.train import tbevents  # noqa: PLC0415

        orig = tbevents.EventFile.write

        def write(self, payload):
            if self.path.stat().st_size > 0:  # the file-version record is written, the first scalars fail
                raise OSError(errno.ENOSPC, "No space left on device")
            return orig(self, payload)
        monkeypatch.setattr(tbevents.EventFile, "write", write)
    rc, out, err = _cli([*TRAIN, f"--workdir={w}"], capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("resflax: error: cannot write") and "No space left on device" in err[0], err
    shown = {"metrics.jsonl": "metrics.jsonl", "config.json": "config.json", "tensorboard": "TensorBoard"}[what]
    assert shown in err[0]
    if what == "config.json":
        assert not (w / "config.json").exists() and not (w / "config.json.tmp").exists()


def test_unexpected_exception_is_an_internal_error_not_bad_input(tmp_path, capsys, monkeypatch):
    """A ValueError raised from inside the compiled step (as JAX/XLA raise them) used to be reported as bad
    input; it is exit 1, with the traceback on stderr and in WORKDIR/errors.log."""
    def broken(*a, **k):
        def step(*args):
            raise ValueError("Mismatched shapes inside some XLA computation")
        return step
    monkeypatch.setattr(loop.step_lib, "make_train_step", broken)
    w = tmp_path / "run"
    rc, out, err = _cli([*TRAIN, f"--workdir={w}"], capsys)
    assert rc == 1
    assert "Traceback (most recent call last)" in err[0]
    assert err[-1].startswith("resflax: internal error: ValueError: Mismatched shapes") and "errors.log" in err[-1]
    log = (w / "errors.log").read_text()
    assert "Traceback" in log and "Mismatched shapes" in log and "resflax train" in log


def test_bad_input_rows_are_exit_2_one_line(tmp_path, capsys):
    cases = [
        (["eval", f"--workdir={tmp_path / 'nothing'}"], "holds no run"),
        (["eval"], "the following arguments are required: --workdir"),
        (["eval", "--workdir", str(tmp_path), "--bogus"], "unrecognized arguments: --bogus"),
        (["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")], "holds no run"),
        (["responses", "--workdir", str(tmp_path), "--out", str(tmp_path / "o"), "--max_images", "0"],
         "--max_images must be positive"),
        (["train", "--config=experiments/cifar10.py:resnet8", f"--workdir={tmp_path / 'w'}",
          "--config.dtype=float16"], "float16"),
    ]
    for argv, msg in cases:
        rc, out, err = _cli(argv, capsys)
        assert rc == 2 and len(err) == 1 and msg in err[0], (argv, err)
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def _refit(w, **keys):
    """The run's config.json with ``keys`` changed (a hand edit, or another resflax's defaults)."""
    f = w / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **keys}))


@pytest.mark.parametrize(("keys", "what", "commands"), [
    # projections the checkpoint does not hold
    ({"shortcut": "B"}, "Could not find parameter", ("eval", "predict", "export")),
    # a head of another shape (eval takes the number of classes from the dataset, so only the others see it)
    ({"num_classes": 7}, "expected to generate shape", ("predict", "export")),
])
def test_readers_refuse_variables_that_do_not_fit_the_network(tmp_path, pristine, capsys, keys, what, commands):
    """A reader takes the variables in the checkpoint's own tree and checks them against the network its config
    builds, by tracing its forward pass: eval, predict and export stop in one line naming what does not fit
    (exit 2), and nothing is moved."""
    from PIL import Image  # noqa: PLC0415

    w = _copy(pristine, tmp_path)
    _refit(w, **keys)
    Image.new("RGB", (32, 32)).save(tmp_path / "img.png")
    before = tree_snapshot(w)
    argvs = {"eval": ["eval", f"--workdir={w}"], "predict": ["predict", f"--workdir={w}", str(tmp_path / "img.png")],
             "export": ["export", f"--workdir={w}", f"--out={tmp_path / 'w.safetensors'}"]}
    for argv in (argvs[c] for c in commands):
        rc, out, err = _cli(argv, capsys)
        assert rc == 2 and len(err) == 1, (argv, err)
        assert "checkpoint 6 in" in err[0] and "do not fit the network its config builds" in err[0], err
        assert what in err[0] and "nothing was moved" in err[0], err
    assert tree_snapshot(w) == before and not (tmp_path / "w.safetensors").exists()


def test_readers_refuse_variables_the_network_does_not_use(tmp_path, capsys):
    """Option B's projections read by an option-A network (config.json edited): Flax would ignore them and
    the predictions would be another network's; refused in one line naming one of them."""
    from test_train import tiny_config  # noqa: PLC0415

    w = tmp_path / "b"
    with mock():
        loop.train_and_evaluate(tiny_config(shortcut="B", num_steps=1, checkpoint_every_steps=1,
                                            eval_every_steps=0), str(w))
    _refit(w, shortcut="A")
    rc, out, err = _cli(["eval", f"--workdir={w}"], capsys)
    assert rc == 2 and len(err) == 1, err
    assert "do not fit the network" in err[0] and " unused, e.g. [" in err[0] and "['shortcut']" in err[0], err
