"""Project settings: see https://docs.kedro.org/en/stable/configure/configuration_basics/."""

import os
from pathlib import Path

from kedro.utils import find_kedro_project
from omegaconf.resolvers import oc

from medical_ct.hooks import (
    AirflowRunTrackingHook,
    NodeTimingHook,
    ParameterCheckHook,
    RedactUrlsHook,
    StoreCheckHook,
)


def sqlite_at_project_root(filename: str) -> str:
    """A sqlite URI for a file at the project root, the same from notebooks/ or any sub-folder."""
    root = find_kedro_project(Path.cwd()) or Path.cwd()
    return f"sqlite:///{(root / filename).resolve().as_posix()}"


def s3_root() -> str:
    """``s3://<bucket>[/<prefix>]`` from MEDICAL_CT_S3_BUCKET and MEDICAL_CT_S3_PREFIX."""
    bucket = os.environ.get("MEDICAL_CT_S3_BUCKET", "").strip() or "medical-ct"
    prefix = os.environ.get("MEDICAL_CT_S3_PREFIX", "").strip("/ ")
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "config_patterns": {
        # conf/<env>/serving.yml: the BentoML service's settings (service.py).
        "serving": ["serving*", "serving*/**"],
        # conf/<env>/review.yml: the review queue's flags and auto-accept policy.
        "review": ["review*", "review*/**"],
        # kedro-mlflow adds this pattern in its hook; the service reads mlflow.yml without hooks.
        "mlflow": ["mlflow*", "mlflow*/**"],
    },
    # conf/local/parameters.yml with `training: {device: cpu}` replaced the whole training
    # group (Kedro's default, destructive), and every run and --params override then failed
    # on the group's missing keys: an environment's parameters override key by key.
    "merge_strategy": {"parameters": "soft"},
    "custom_resolvers": {
        # ${oc.env:...} outside credentials.yml, so that MLFLOW_TRACKING_URI overrides mlflow.yml.
        "oc.env": oc.env,
        "sqlite_at_project_root": sqlite_at_project_root,
        "s3_root": s3_root,  # conf/s3/globals.yml: every path under the bucket and prefix
    },
}

# Hooks marked tryfirst run in the reverse of this order: store and parameter checks first.
HOOKS = (
    AirflowRunTrackingHook(),
    StoreCheckHook(),
    ParameterCheckHook(),
    RedactUrlsHook(),
    NodeTimingHook(),
)
