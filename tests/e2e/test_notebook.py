"""The notebook runs top to bottom against a trained project, through the Kedro catalog."""

import shutil

import nbformat
from nbclient import NotebookClient

from tests.conftest import PROJECT_ROOT, project_env

NOTEBOOK = "mednist_exploration.ipynb"


def test_notebook_executes_and_shows_the_champions_errors(trained_project, monkeypatch):
    notebook_path = trained_project / "notebooks" / NOTEBOOK
    shutil.copy(PROJECT_ROOT / "notebooks" / NOTEBOOK, notebook_path)
    notebook = nbformat.read(notebook_path, as_version=4)
    env = project_env(trained_project)
    env.pop("MLFLOW_TRACKING_URI")  # the notebook must find the project's store on its own
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(notebook_path.parent)}},
    ).execute()

    outputs = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    ]
    text = "".join(output.get("text", "") for output in outputs)
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert "champion version 1:" in text
    assert "dataset fingerprint" in text
    shown = [
        [sorted(output.get("data", {})) or output["output_type"] for output in cell.outputs]
        for cell in notebook.cells
        if cell.cell_type == "code"
    ]
    assert len(images) >= 3, f"outputs per code cell: {shown}"
