"""The notebook runs top to bottom against a trained project, through the Kedro catalog."""

import re
import shutil
import subprocess
import tomllib

import nbformat
from nbclient import NotebookClient

from tests.conftest import KEDRO, PROJECT_ROOT, make_project, project_env

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


def test_kedro_jupyter_lab_runs_from_the_dev_environment(tmp_path):
    """README starts the notebook with `kedro jupyter lab`, which failed: JupyterLab was in no
    extra of pyproject.toml, so `make install` left it out. `--version` goes through Kedro's
    check and kernel spec, then exits instead of serving."""
    extras = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    dev = {
        re.split(r"[<>=~\[ ]", requirement)[0]
        for requirement in extras["optional-dependencies"]["dev"]
    }
    assert "jupyterlab" in dev
    project = make_project(tmp_path / "project")
    env = project_env(project, JUPYTER_DATA_DIR=str(tmp_path / "jupyter"))

    result = subprocess.run(
        [KEDRO, "jupyter", "lab", "--version"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "jupyter/kernels/kedro_medical_ct/kernel.json").is_file()
