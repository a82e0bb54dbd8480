"""Project settings: see https://docs.kedro.org/en/stable/configure/configuration_basics/."""

from omegaconf.resolvers import oc

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # ${oc.env:...} outside credentials.yml, so that MLFLOW_TRACKING_URI overrides mlflow.yml.
    "custom_resolvers": {"oc.env": oc.env},
}
