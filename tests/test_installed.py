"""resflax as its users install it: the wheel (``pip wheel .``) in a fresh virtual environment, every command run
from an empty folder, with no checkout on the path. The dependencies come from this environment's site-packages
(through a ``.pth`` line: their own ``.pth`` files, this checkout's editable install among them, are not read),
so the test costs no download; resflax itself is only the wheel's copy."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = os.environ.get("TFDS_DATA_DIR")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not REAL or not (Path(REAL) / "cifar10").exists(), reason="TFDS_DATA_DIR without cifar10"),
]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(resflax executable, an empty working folder, env) of a fresh venv holding only the wheel's resflax."""
    t = tmp_path_factory.mktemp("installed")
    wheels = t / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True, text=True, cwd=t)
    wheel = next(wheels.glob("resflax-*.whl"))
    venv = t / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, text=True, cwd=t)
    work = t / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(JAX_PLATFORMS="cpu", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    return venv / "bin" / "resflax", work, env


def run(installed, *args, rc=0, timeout=900):
    exe, work, env = installed
    r = subprocess.run([str(exe), *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == rc, (args, r.stdout[-2000:], r.stderr[-2000:])
    return r.stdout


def test_the_wheel_alone_is_imported(installed):
    exe, work, env = installed
    where = subprocess.run([str(exe.parent / "python"), "-c", "import resflax, sys; print(resflax.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert str(exe.parents[1]) in where and str(ROOT) not in where
    shipped = exe.parents[1] / "lib"
    assert list(shipped.glob("python*/site-packages/resflax/experiments/cifar10.py"))
    names = subprocess.run([str(exe.parent / "python"), "-c", "from resflax.data import imagenet; n = "
                            "imagenet.class_names(); print(len(n), n[0])"], cwd=work, env=env, capture_output=True,
                           text=True, check=True).stdout
    assert names.split() == ["1000", "tench"]  # the package data file is in the wheel


def test_every_command_from_an_empty_folder(installed):
    exe, work, env = installed
    assert "resnet110" in run(installed, "summary")
    assert REAL in run(installed, "prepare-data", "--data_dir", REAL)  # already prepared: says where it is
    # CIFAR-10 and ImageNet configs by name, as the README writes them
    common = ["--config.num_steps=2", "--config.log_every_steps=1", "--config.progress=False",
              "--config.checkpoint_every_steps=2"]
    out = run(installed, "train", "--config=experiments/cifar10.py:resnet8", f"--config.data_dir={REAL}",
              "--config.batch_size=16", "--config.eval_batch_size=1000", "--config.pad_layout=split", *common,
              "--workdir=cifar")
    assert "final test error" in out
    run(installed, "make-tiny-imagenet", "--out", "tiny")
    out = run(installed, "train", "--config=experiments/imagenet.py:tiny", "--config.data_dir=tiny", *common,
              "--workdir=imagenet")
    assert "final test error" in out
    ev = json.loads(run(installed, "eval", "--workdir", "cifar", "--json"))
    assert ev["step"] == 2 and ev["test_examples"] == 10_000
    run(installed, "export", "--workdir", "cifar", "--out", "w.safetensors")
    out = run(installed, "import", "w.safetensors", "--model", "resnet8", "--workdir", "imported")
    assert "imported" in out
    from PIL import Image  # noqa: PLC0415 (this test only)

    Image.fromarray(np.full((32, 32, 3), 127, np.uint8)).save(work / "grey.png")
    assert "grey.png" in run(installed, "predict", "--workdir", "imported", "grey.png")
    run(installed, "report", "cifar", "--out", "report")
    assert (work / "report").is_dir() and any((work / "report").iterdir())
    run(installed, "responses", "--workdir", "cifar", "--max_images", "16", "--out", "responses")
    assert any((work / "responses").iterdir())
