"""The catalog resolves the same from any working directory (a notebook runs in notebooks/)."""

import shutil

import yaml
from kedro.config import OmegaConfigLoader

from medical_ct.settings import CONFIG_LOADER_ARGS
from tests.conftest import PROJECT_ROOT

PATH_KEYS = ("path", "filepath", "filename")  # the keys Kedro makes absolute against the project


def relative_paths_outside_path_keys(entry: object, key: str = "") -> list[str]:
    """Strings under ``data/`` that Kedro would leave relative (read from the cwd)."""
    if isinstance(entry, dict):
        return [found for k, v in entry.items() for found in relative_paths_outside_path_keys(v, k)]
    if isinstance(entry, str) and entry.startswith("data/") and key not in PATH_KEYS:
        return [f"{key}: {entry}"]
    return []


def test_every_local_location_in_the_catalog_is_one_kedro_makes_absolute():
    """shards_from once held bare strings: the notebook, run from notebooks/, missed every shard."""
    catalog = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), env="local", **CONFIG_LOADER_ARGS)
    entries = catalog["catalog"]
    assert any("shards_from" in entry for entry in entries.values())
    leftovers = {
        name: found
        for name, entry in entries.items()
        if (found := relative_paths_outside_path_keys(entry))
    }
    assert leftovers == {}
    assert relative_paths_outside_path_keys({"shards_from": {"raw": "data/x"}}) == ["raw: data/x"]


def test_an_environment_s_parameters_override_key_by_key_and_runtime_params_still_apply(
    tmp_path,
):
    """conf/local/parameters.yml with `training: {device: cpu}` replaced the whole training
    group (Kedro's default merge is destructive): every run failed on the group's missing
    keys, and so did the README's --params commands (production hunt of 2026-12-05)."""
    conf = tmp_path / "conf"
    shutil.copytree(PROJECT_ROOT / "conf", conf)
    (conf / "local" / "parameters.yml").write_text(yaml.safe_dump({"training": {"device": "cpu"}}))
    base = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), **CONFIG_LOADER_ARGS)["parameters"]

    loader = OmegaConfigLoader(
        str(conf),
        runtime_params={"training": {"max_epochs": 2}, "data_processing": {"full_rescan": True}},
        **CONFIG_LOADER_ARGS,
    )
    parameters = loader["parameters"]

    assert parameters["training"] == {**base["training"], "device": "cpu", "max_epochs": 2}
    assert parameters["data_processing"] == {**base["data_processing"], "full_rescan": True}
