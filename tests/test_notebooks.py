"""The notebooks are committed without outputs and run top to bottom on a tiny trained model."""

import os
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["gradcam_for_clinicians.ipynb", "zero_shot.ipynb"]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    assert notebook.metadata["kernelspec"]["name"] == "python3"


def test_every_notebook_in_the_folder_is_checked():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name, eval_model, eval_data, eval_prompts, tmp_path, monkeypatch):
    """Executed in a kernel running this interpreter (jupyter_client starts the "python3" kernel spec
    with sys.executable), so it works from `.venv/bin/python -m pytest` without an activated venv."""
    from nbclient import NotebookClient

    monkeypatch.setenv("MEDCLIPIN_CHECKPOINT", str(eval_model))
    monkeypatch.setenv("MEDCLIPIN_MANIFEST", str(eval_data))
    monkeypatch.setenv("MEDCLIPIN_PROMPTS", str(eval_prompts))
    monkeypatch.setenv("MEDCLIPIN_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("MEDCLIPIN_BOOTSTRAP", "50")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # the kernel imports medclipin from this checkout even when it is not installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(NOTEBOOKS.parent), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    # one extra cell (in memory only) reports the kernel's environment
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    client = NotebookClient(notebook, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert [o for o in outputs if "image/png" in o.get("data", {})], "the notebook shows its figure"
    assert list((tmp_path / "out").glob("*.png"))
    kernel_prefix = notebook.cells[-1].outputs[0]["text"].strip()
    assert kernel_prefix == sys.prefix  # the same environment (the venv), not a python found on PATH
