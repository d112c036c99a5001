"""Refusals in resflax's own words, one line, exit 2 (issue 23 item 5): a PyTorch pickle holding code is
refused without running it, with how to convert a trusted file to safetensors (never PyTorch's advice to
re-run with ``weights_only=False``); a truncated ILSVRC tar given to ``prepare-data`` is named."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest

from resflax import cli
from resflax.data import imagenet_source


class _Evil:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_with_code_is_refused_in_one_line_without_running_it(tmp_path, capsys, monkeypatch):
    torch = pytest.importorskip("torch")  # writes the pickle; the tar checks below need no torch
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": _Evil(marker)}, evil)
    rc = cli.main(["import", str(evil), "--model", "resnet8", "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"resflax: error: {evil} was refused: it contains Python objects other than tensors "
                          "(posix.system), which resflax does not unpickle for safety")
    assert "only if you trust the file, convert it to safetensors with python -c" in err
    assert f"import {tmp_path / 'evil.safetensors'}" in err
    assert "weights_only=True" not in err and "will likely succeed" not in err  # PyTorch's text is not shown
    assert not marker.exists(), "the pickle's code ran"
    assert not (tmp_path / "run").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["evil.pth"]


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("cut", ["mid-block", "block-boundary", "in-a-header"])
def test_a_truncated_ilsvrc_tar_is_named(tmp_path, capsys, monkeypatch, cut):
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    rng = np.random.default_rng(0)
    manual = tmp_path / "tars"
    manual.mkdir()
    members = {f"ILSVRC2012_val_{i:08d}.JPEG": rng.bytes(7000 + 300 * i) for i in range(4)}
    train, val = (manual / t for t in imagenet_source.TARS)
    _tar(train, {"n01440764.tar": rng.bytes(20000)})
    _tar(val, members)
    size = val.stat().st_size
    # the second member's header sits at 512 (first header) + 7168 (its data, padded)
    keep = {"mid-block": size // 2 + 7, "block-boundary": 512 * (size // 1024), "in-a-header": 512 + 7168 + 100}[cut]
    with open(val, "r+b") as f:
        f.truncate(keep)
    rc = cli.main(["prepare-data", "--dataset", "imagenet2012", "--data_dir", str(tmp_path / "d"),
                   "--manual_dir", str(manual)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{val} is not a complete tar archive" in err and "truncated" in err
    assert str(train) not in err


def test_the_tar_check_passes_complete_tars_and_names_a_file_that_is_not_one(tmp_path):
    rng = np.random.default_rng(1)
    for n in (1, 3, 40):  # sizes that end at, and away from, tarfile's 10 KiB records
        _tar(tmp_path / f"ok{n}.tar", {f"m{i}": rng.bytes(999 * i) for i in range(n)})
        assert imagenet_source._tar_problem(tmp_path / f"ok{n}.tar") is None  # noqa: SLF001
    f = tmp_path / "ILSVRC2012_img_val.tar"
    f.write_bytes(b"<html>not found</html>" * 100)
    assert imagenet_source._tar_problem(f).startswith(f"{f} is not a complete tar archive (unreadable header")  # noqa: SLF001
