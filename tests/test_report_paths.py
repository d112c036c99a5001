"""Generated reports write no machine-specific absolute paths, and ``resflax responses`` has a default ``--out``."""

import json
import re
import shutil
from pathlib import Path

import pytest
from test_train import mock

from resflax.analysis import responses
from resflax.analysis.runs import portable_path
from resflax.cli import main

# A "/" that starts an absolute path: not after a name, ".", "~", "…" or another "/".
ABSOLUTE = re.compile(r"(?<![\w.~…/])/[\w.-]")


@pytest.fixture
def here(tmp_path, monkeypatch):
    """The current directory four levels below ``tmp_path``, and a home directory beside it."""
    cwd = tmp_path / "w1" / "w2" / "w3" / "cwd"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return cwd


def test_portable_path(here, tmp_path):
    assert portable_path(here / "runs" / "r20") == "runs/r20"
    assert portable_path("runs/r20/") == "runs/r20"  # relative stays relative
    assert portable_path(str(here)) == "."
    assert portable_path(str(tmp_path / "w1" / "w2" / "w3" / "shared" / "tfds")) == "../shared/tfds"
    assert portable_path(str(tmp_path / "w1" / "w2" / "data")) == "../../data"
    assert portable_path(str(tmp_path / "w1" / "a" / "b")) == "…/a/b"  # three levels up
    assert portable_path(str(tmp_path / "x" / "y" / "a" / "b")) == "…/a/b"
    assert portable_path(str(tmp_path / "home" / "data" / "tfds")) == "~/data/tfds"
    assert portable_path("~/data/tfds") == "~/data/tfds"
    assert portable_path(str(tmp_path / "home")) == "~"
    assert portable_path("") == ""


def test_report_writes_no_absolute_path(here, tmp_path):
    """The data_dir a run recorded (absolute, far from here) and the run paths come out portable."""
    data_dir = tmp_path / "elsewhere" / "deep" / "shared" / "tfds"
    run = here / "runs" / "r8"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(dict(model="resnet8", seed=0, num_steps=64_000, schedule_scale=1e-4,
                                                     lr_boundaries=[32_000, 48_000], batch_size=16)))
    lines = [{"event": "data", "data_dir": str(data_dir)}, {"step": 6, "split": "train", "error": 50.0},
             {"step": 6, "split": "test", "error": 55.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["report", "runs", "--out", "out"]) == 0
    for name in ("report.md", "table6.md"):
        text = (here / "out" / name).read_text()
        assert "TFDS data_dir …/shared/tfds" in text, name
        assert str(tmp_path) not in text and not ABSOLUTE.search(text), (name, ABSOLUTE.search(text))
    md = (here / "out" / "report.md").read_text()
    assert "`resflax report runs --out out`" in md and "| runs/r8 | ResNet-8 |" in md


def test_responses_default_out(pristine, here, capsys):
    shutil.copytree(pristine[0], here / "runs" / "r8")
    with mock():
        assert main(["responses", "--workdir", "runs/r8", "--max_images", "8"]) == 0
    out = here / "runs" / "r8" / "responses"
    assert {p.name for p in out.iterdir()} >= {"fig7.png", "responses.csv", "responses.md"}
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("wrote runs/r8/responses/fig7.png") and "no --out given" in last
    md = (out / "responses.md").read_text()
    assert "| runs/r8 | resnet8 |" in md and str(here) not in md and "TFDS data_dir" in md


def test_default_out_for_several_runs(here, tmp_path):
    assert responses.default_out(["runs/study/plain20", "runs/study/resnet20/"]) == Path("runs/study/responses")
    assert responses.default_out(["runs/a/x", "runs/b/y"]) == Path("runs/responses")
    assert responses.default_out(["runs/a", "runs/a/"]) == Path("runs/a/responses")  # one run, named twice
    far = [str(tmp_path / "r" / n) for n in ("a", "b")]
    assert responses.default_out(far) == tmp_path / "r" / "responses"  # outside here: a path that works
