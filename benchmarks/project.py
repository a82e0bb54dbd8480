"""What the benchmarks share: a fresh Kedro project around this repo's conf."""

import shutil
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def make_project(root: Path) -> Path:
    """A project using this repo's conf and installed package, with its own data and store."""
    shutil.copytree(PROJECT_ROOT / "conf", root / "conf")
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy(PROJECT_ROOT / name, root / name)
    (root / "src").mkdir()
    return root
