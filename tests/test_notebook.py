"""The Colab notebook runs top to bottom (CPU, tiny config, TFDS mock data), so it cannot rot."""

import ast
import csv
import io
import os
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path
from types import SimpleNamespace

import jax
import jaxlib
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "resflax_colab.ipynb"
PARAMETERS = ("RESFLAX_SOURCE", "INSTALL", "MODEL", "NUM_STEPS", "WORKDIR", "DATA_DIR")


def parameters_cell(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"
    return tagged[0]


def test_notebook_is_parameterised_and_stored_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    src = nb.cells[parameters_cell(nb)].source
    for name in PARAMETERS:
        assert f"\n{name} = " in "\n" + src, f"parameter {name} missing"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit the notebook without outputs"
    assert "OWNER" not in NOTEBOOK.read_text(), "no placeholder repository: RESFLAX_SOURCE names it"


def git(*args, cwd=ROOT) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def nbfn():
    """The notebook's cell of functions (resolve_source & co.), run in a namespace of its own."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cells = [c.source for c in nb.cells if c.cell_type == "code" and "def resolve_source(" in c.source]
    assert len(cells) == 1
    tree = ast.parse(cells[0])
    # Functions only: imports, definitions and constants, so running it has no effect of its own.
    assert all(isinstance(s, ast.Import | ast.ImportFrom | ast.FunctionDef | ast.Assign) for s in tree.body)
    assert all(isinstance(s.value, ast.Constant | ast.Tuple) for s in tree.body if isinstance(s, ast.Assign))
    ns = {}
    exec(compile(tree, "<notebook functions>", "exec"), ns)
    return SimpleNamespace(**ns)


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


def test_source_local_checkout(nbfn, tmp_path):
    assert nbfn.resolve_source(str(ROOT), cwd=tmp_path) == (ROOT, "a local checkout")
    assert nbfn.resolve_source("..", cwd=ROOT / "notebooks") == (ROOT, "a local checkout")
    # "auto": the checkout the notebook sits in (as CI runs it), else ./resflax.
    assert nbfn.resolve_source("auto", cwd=ROOT / "notebooks") == (ROOT, "the checkout around this notebook")
    assert not list(tmp_path.iterdir()), "a local checkout is used in place, nothing copied"


@pytest.mark.parametrize("fmt, prefix", [("tar.gz", ""), ("zip", "resflax-main/")])
def test_source_archive(nbfn, tmp_path, fmt, prefix):
    tmp_path = tmp_path.resolve()
    archive = tmp_path / f"resflax.{fmt}"
    git("archive", f"--format={fmt}", *([f"--prefix={prefix}"] if prefix else []), "-o", str(archive), "HEAD")
    repo, how = nbfn.resolve_source(archive.name, cwd=tmp_path, workspace="ws")
    assert repo.is_relative_to(tmp_path / "ws") and how == f"extracted from {archive}"
    assert repo == (tmp_path / "ws" / "resflax.tar.gz" if not prefix else tmp_path / "ws" / "resflax.zip" / prefix)
    assert (repo / "src" / "resflax" / "__init__.py").read_text() == git("show", "HEAD:src/resflax/__init__.py")
    assert (repo / "experiments" / "cifar10.py").is_file()
    # "upload" (Colab): the uploaded archive, from google.colab.files.upload()'s {name: bytes}.
    up, how = nbfn.resolve_source("upload", cwd=tmp_path, upload=lambda: {archive.name: archive.read_bytes()})
    assert how == f"uploaded {archive.name}" and (up / "setup.cfg").read_text() == (repo / "setup.cfg").read_text()
    with pytest.raises(ValueError, match="works on Colab only") as e:
        nbfn.resolve_source("upload", cwd=tmp_path)
    one_line_error(e)


def test_source_git_url(nbfn, tmp_path):
    tmp_path = tmp_path.resolve()
    head = git("rev-parse", "HEAD").strip()
    repo, how = nbfn.resolve_source(f"file://{ROOT}", cwd=tmp_path)
    assert repo.is_relative_to(tmp_path / "resflax-sources") and how == f"cloned from file://{ROOT}"
    assert git("rev-parse", "HEAD", cwd=repo).strip() == head
    assert nbfn.resolve_source(f"file://{ROOT}", cwd=tmp_path)[0] == repo  # a rerun reuses the clone
    # @REF: a commit is no branch for `git clone --branch`; the function falls back to a full clone.
    at_commit, _ = nbfn.resolve_source(f"file://{ROOT}@{head}", cwd=tmp_path)
    assert at_commit != repo and git("rev-parse", "HEAD", cwd=at_commit).strip() == head
    assert nbfn.split_ref("git@github.com:someone/resflax.git@feature/x") == (
        "git@github.com:someone/resflax.git", "feature/x")
    assert nbfn.split_ref("https://github.com/someone/resflax/tree/v1.0") == (
        "https://github.com/someone/resflax.git", "v1.0")
    assert nbfn.split_ref("https://user@host.org/r.git") == ("https://user@host.org/r.git", None)
    with pytest.raises(RuntimeError, match=r"git clone file://.*/nothing-here failed: fatal: .*not .*repository") as e:
        nbfn.resolve_source(f"file://{tmp_path}/nothing-here", cwd=tmp_path)
    one_line_error(e)


def test_source_refused(nbfn, tmp_path):
    tmp_path = tmp_path.resolve()
    (tmp_path / "notrepo" / "src").mkdir(parents=True)
    (tmp_path / "notrepo" / "setup.cfg").write_text("[metadata]\n")
    with pytest.raises(ValueError) as e:
        nbfn.resolve_source("notrepo", cwd=tmp_path)
    assert one_line_error(e) == (f"RESFLAX_SOURCE 'notrepo' is not a resflax checkout: {tmp_path / 'notrepo'} has no "
                                 "src/resflax/__init__.py, experiments/cifar10.py")
    with tarfile.open(tmp_path / "other.tar.gz", "w:gz") as t:
        info = tarfile.TarInfo("other/README.md")
        t.addfile(info, io.BytesIO(b""))
    with pytest.raises(ValueError, match=r"^the archive other.tar.gz is not a resflax checkout: .* has no src/") as e:
        nbfn.resolve_source(str(tmp_path / "other.tar.gz"), cwd=tmp_path)
    one_line_error(e)
    (tmp_path / "notes.txt").write_text("not an archive")
    with pytest.raises(ValueError, match="notes.txt is not a .zip or .tar.gz archive") as e:
        nbfn.resolve_source("notes.txt", cwd=tmp_path)
    one_line_error(e)
    with pytest.raises(ValueError, match="'no/such/thing' is no file, folder or git URL") as e:
        nbfn.resolve_source("no/such/thing", cwd=tmp_path)
    one_line_error(e)


def test_source_auto_outside_a_checkout(nbfn, tmp_path):
    tmp_path = tmp_path.resolve()
    assert nbfn.find_checkout(tmp_path) is None
    with pytest.raises(ValueError) as e:
        nbfn.resolve_source("auto", cwd=tmp_path)
    msg = one_line_error(e)
    assert msg.startswith("RESFLAX_SOURCE = 'auto' found no resflax checkout around this notebook ")
    assert "set RESFLAX_SOURCE in the parameters cell to " in msg
    for form in ("git URL", "https://github.com/USER/REPO.git", "@BRANCH", "checkout's path", ".zip/.tar.gz",
                 "'upload'"):
        assert form in msg
    # A checkout cloned to ./resflax (or one of the candidates, e.g. on a mounted Google Drive) is found.
    copy = tmp_path / "drive" / "resflax"
    nbfn.extract(git_archive(tmp_path), copy)
    assert nbfn.resolve_source("auto", cwd=tmp_path, candidates=[copy]) == (copy, "a checkout found there")
    copy.rename(tmp_path / "resflax")
    assert nbfn.resolve_source("auto", cwd=tmp_path) == (tmp_path / "resflax", "a checkout found there")


def git_archive(tmp_path) -> Path:
    archive = tmp_path / "head.tar.gz"
    git("archive", "--format=tar.gz", "-o", str(archive), "HEAD")
    return archive


def test_describe_accelerator(nbfn):
    tpu = [SimpleNamespace(device_kind="TPU v2")] * 8
    assert nbfn.describe_accelerator("tpu", tpu) == "TPU (8 devices: TPU v2)"
    assert nbfn.describe_accelerator("gpu", [SimpleNamespace(device_kind="Tesla T4")]) == "GPU (1 device: Tesla T4)"
    cpu = [SimpleNamespace(device_kind="cpu")]
    assert nbfn.describe_accelerator("cpu", cpu) == "CPU only (training will be slow)"
    assert nbfn.describe_accelerator("cpu", cpu, "gpu") == (
        "CPU only (training will be slow; this machine has a GPU that JAX does not use)")


def test_jax_plan_keeps_a_jax_in_range_with_its_plugin(nbfn):
    """Issue 24 item 4: a runtime's JAX that resflax's range admits is pinned, with jaxlib and its accelerator
    plugin, for the install (pip keeps them); one outside the range (or none) is left to pip, and only then does
    the accelerator's build follow."""
    req = nbfn.jax_requirement(ROOT)
    line = next(ln.strip() for ln in (ROOT / "setup.cfg").read_text().splitlines() if ln.strip().startswith("jax>"))
    assert str(req) == str(nbfn.Requirement(line)), "the range is read from the checkout's setup.cfg"
    colab_gpu = {"jax": "0.12.0.1", "jax-cuda12-pjrt": "0.12.0.1", "jax-cuda12-plugin": "0.12.0.1",
                 "jaxlib": "0.12.0.1"}
    assert nbfn.jax_plan(colab_gpu, req, "gpu") == ([f"{n}==0.12.0.1" for n in colab_gpu], None)
    colab_tpu = {"jax": "0.10.2", "jaxlib": "0.10.2", "libtpu": "0.0.30"}
    assert nbfn.jax_plan(colab_tpu, req, "tpu") == (["jax==0.10.2", "jaxlib==0.10.2", "libtpu==0.0.30"], None)
    assert nbfn.jax_plan({"jax": "0.9.2", "jaxlib": "0.9.2"}, req, "tpu") == ([], "tpu")
    assert nbfn.jax_plan({"jax": "99.0", "jaxlib": "99.0"}, req, "gpu") == ([], "cuda12")
    assert nbfn.jax_plan({}, req, None) == ([], None)
    assert nbfn.describe_jax(colab_tpu) == "jax 0.10.2, jaxlib 0.10.2, libtpu 0.0.30"


@pytest.mark.parametrize("runtime, accelerator, pins, calls, said", [
    ({"jax": "0.12.0.1", "jax-cuda12-plugin": "0.12.0.1", "jaxlib": "0.12.0.1"}, "gpu",
     "jax==0.12.0.1\njax-cuda12-plugin==0.12.0.1\njaxlib==0.12.0.1\n", 1,
     "kept this Python's JAX (jax 0.12.0.1, jax-cuda12-plugin 0.12.0.1, jaxlib 0.12.0.1): resflax supports jax<"),
    ({"jax": "0.4.30", "jaxlib": "0.4.30"}, "gpu", "", 2,
     "installed jax 0.10.2, jaxlib 0.10.2 for resflax (jax<"),
], ids=["in-range", "out-of-range"])
def test_install_resflax_pins_or_adds_the_build(nbfn, monkeypatch, runtime, accelerator, pins, calls, said):
    """The notebook's install function, with pip and the installed packages faked: the commands it runs."""
    ns = nbfn.install_resflax.__globals__
    installed = [dict(runtime)]
    runs = []

    def run(args, check):
        assert check and args[:4] == [sys.executable, "-m", "pip", "install"]
        if "-e" in args:
            runs.append((args, Path(args[args.index("-c") + 1]).read_text()))
            if not pins:  # pip installs the newest JAX in range (say 0.10.2, on Python 3.11)
                installed.append({"jax": "0.10.2", "jaxlib": "0.10.2"})
        else:
            runs.append((args, None))

    monkeypatch.setitem(ns, "jax_installed", lambda: installed[-1])
    monkeypatch.setattr(ns["subprocess"], "run", run)
    line = nbfn.install_resflax(ROOT, accelerator)
    assert len(runs) == calls and runs[0][0][-2:] == ["-e", str(ROOT)] and runs[0][1] == pins
    if calls == 2:
        assert runs[1][0][4:] == ["-q", "jax[cuda12]==0.10.2"]
        assert line.endswith("; this Python had jax 0.4.30), with the jax[cuda12] build")
    assert line.startswith(said) and "\n" not in line


@pytest.mark.slow
def test_installing_resflax_the_notebooks_way_keeps_the_runtimes_jax(nbfn, tmp_path):
    """Issue 24 item 4, for real: a new venv whose packages are this Python's (its JAX: in CI's second stage the
    newest, in the first 0.10.2), seen behind the venv's own site-packages as a Colab runtime's preinstalled JAX.
    The notebook's ``install_resflax`` (its cell, run by that venv's Python) installs resflax into the venv; the
    venv's ``jax.__version__``, jaxlib and plugins are as before. A JAX pip installed would land in the venv and
    shadow this Python's (this Python's own packages are never changed: pip uninstalls only inside the venv)."""
    venv = tmp_path / "runtime"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # resflax only as the venv has it

    def in_venv(*args: str) -> str:
        return subprocess.run([py, *args], check=True, capture_output=True, text=True, env=env).stdout.strip()

    ours = sysconfig.get_paths()["purelib"]
    theirs = in_venv("-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    Path(theirs, "runtime.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    show = "import jax, jaxlib; print(jax.__version__, jaxlib.__version__)"
    before = in_venv("-c", show)
    assert before == f"{jax.__version__} {jaxlib.__version__}"
    cell = next(c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if "def install_resflax(" in c.source)
    script = tmp_path / "install.py"
    script.write_text(f"{cell}\nprint(jax_installed())\nprint(install_resflax({str(ROOT)!r}))\nprint(jax_installed())\n")
    out = in_venv(str(script)).splitlines()
    assert out[0] == out[2] and "'jax'" in out[0], out
    assert out[1].startswith(f"kept this Python's JAX (jax {jax.__version__}, jaxlib {jaxlib.__version__}"), out
    assert in_venv("-c", show) == before
    located = in_venv("-c", "import importlib.metadata as m, resflax; print(m.distribution('resflax').locate_file(''), "
                      "resflax.__file__)")
    site_dir, module = located.split()
    assert Path(site_dir) == Path(theirs) and Path(module).is_relative_to(ROOT / "src"), located


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    from nbclient import NotebookClient  # noqa: PLC0415

    nb = nbformat.read(NOTEBOOK, as_version=4)
    workdir = tmp_path / "run"
    # Injected after the parameters cell, as papermill would; the mock stands in for CIFAR-10 (no network).
    injected = f"""
MODEL = "resnet8"
NUM_STEPS = 4
WORKDIR = {str(workdir)!r}
DATA_DIR = None
RESFLAX_SOURCE = "auto"
INSTALL = "auto"
OVERRIDES = {{"batch_size": 16, "eval_batch_size": 32, "log_every_steps": 1, "checkpoint_every_steps": 2}}
import tensorflow_datasets as tfds
_mock = tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE)
_mock.__enter__()
"""
    nb.cells.insert(parameters_cell(nb) + 1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected"]}))
    # The kernel spec runs `python`: make it this interpreter (the venv that has resflax).
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"resflax source: {ROOT} (the checkout around this notebook)" in outputs
    assert f"JAX: jax {jax.__version__}, jaxlib {jaxlib.__version__}" in outputs
    assert "accelerator: CPU only (training will be slow)" in outputs
    assert f"resflax {__import__('resflax').__version__} from {ROOT}" in outputs
    assert "final test error" in outputs
    report = workdir / "report"
    for name in ("fig6.png", "fig7.png", "table6.md", "report.md", "responses.csv"):
        assert (report / name).stat().st_size > 0, name
    assert "| ResNet-8 | 8 | 75,290 |" in (report / "table6.md").read_text()
    with open(report / "responses.csv") as f:
        assert len(list(csv.DictReader(f))) == 7
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # Fig. 6 and Fig. 7 shown in the notebook
