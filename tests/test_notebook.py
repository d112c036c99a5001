"""The Colab notebook runs top to bottom (CPU, tiny config, TFDS mock data), so it cannot rot."""

import csv
import os
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "resflax_colab.ipynb"
PARAMETERS = ("MODEL", "NUM_STEPS", "WORKDIR", "DATA_DIR", "INSTALL")


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
    assert f"resflax {__import__('resflax').__version__} from {Path(__file__).resolve().parents[1]}" in outputs
    assert "final test error" in outputs
    report = workdir / "report"
    for name in ("fig6.png", "fig7.png", "table6.md", "report.md", "responses.csv"):
        assert (report / name).stat().st_size > 0, name
    assert "| ResNet-8 | 8 | 75,290 |" in (report / "table6.md").read_text()
    with open(report / "responses.csv") as f:
        assert len(list(csv.DictReader(f))) == 7
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # Fig. 6 and Fig. 7 shown in the notebook
