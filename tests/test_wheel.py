"""The project's wheel (`kedro package`, `pip install .`) holds what the installed package reads."""

import shutil
import subprocess
import sys

from tests.conftest import PROJECT_ROOT

# What the service reads with importlib.resources (medical_ct/serving/http.py).
PACKAGE_FILES = ("page.html", "docs.html")

READ_FROM_THE_INSTALL = """
import sys
sys.path.insert(0, sys.argv[1])
from importlib.resources import files
import medical_ct
assert medical_ct.__file__.startswith(sys.argv[1]), medical_ct.__file__
for name in sys.argv[2:]:
    assert files("medical_ct.serving").joinpath(name).read_text().lstrip().startswith("<!")
"""


def test_an_installed_wheel_serves_the_page_and_the_docs(tmp_path):
    """The wheel held the package's modules only: installed from it, the service answered
    500 for / and /docs (FileNotFoundError on page.html), while the checkout worked."""
    source = tmp_path / "source"  # a copy: setuptools writes build/ and *.egg-info beside it
    shutil.copytree(
        PROJECT_ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "wheel", source],
        check=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "wheel").glob("medical_ct-*.whl")
    target = tmp_path / "installed"
    subprocess.run([*pip, "install", "--no-deps", "--target", target, wheel], check=True)

    subprocess.run(
        [sys.executable, "-I", "-c", READ_FROM_THE_INSTALL, str(target), *PACKAGE_FILES],
        check=True,
        timeout=120,
    )
