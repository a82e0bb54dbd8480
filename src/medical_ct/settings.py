"""Project settings: see https://docs.kedro.org/en/stable/configure/configuration_basics/."""

from pathlib import Path

from kedro.utils import find_kedro_project
from omegaconf.resolvers import oc

from medical_ct.hooks import NodeTimingHook, ParameterCheckHook


def sqlite_at_project_root(filename: str) -> str:
    """A sqlite URI for a file at the project root, the same from notebooks/ or any sub-folder."""
    root = find_kedro_project(Path.cwd()) or Path.cwd()
    return f"sqlite:///{(root / filename).resolve().as_posix()}"


CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "config_patterns": {
        # conf/<env>/serving.yml: the BentoML service's settings (service.py).
        "serving": ["serving*", "serving*/**"],
        # kedro-mlflow adds this pattern in its hook; the service reads mlflow.yml without hooks.
        "mlflow": ["mlflow*", "mlflow*/**"],
    },
    "custom_resolvers": {
        # ${oc.env:...} outside credentials.yml, so that MLFLOW_TRACKING_URI overrides mlflow.yml.
        "oc.env": oc.env,
        "sqlite_at_project_root": sqlite_at_project_root,
    },
}

HOOKS = (ParameterCheckHook(), NodeTimingHook())
