"""The catalog resolves the same from any working directory (a notebook runs in notebooks/)."""

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
