"""The Makefile's targets that touch data keep what nobody can make again."""

import shutil
import subprocess
import tarfile

from tests.conftest import PROJECT_ROOT


def test_make_clean_removes_derived_data_and_keeps_what_people_sent(tmp_path):
    """`make clean` ran `rm -rf data/0*/*`: reviewed labels, the review audit and the
    prediction log went with the derived layers, while mlflow.db kept versions naming them."""
    shutil.copy(PROJECT_ROOT / "Makefile", tmp_path / "Makefile")
    kept = [
        "data/01_raw/feedback_accepted/records/Hand-1.json",
        "data/01_raw/review_audit/20261204T1200/x.json",
        "data/01_raw/prediction_log/2026/12/04/10/w.parquet",
        "data/02_intermediate/.gitkeep",
        "mlflow.db",
    ]
    removed = ["data/02_intermediate/decoded_raw/index.parquet", "data/08_reporting/r.json"]
    for name in kept + removed:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")

    subprocess.run(["make", "clean"], cwd=tmp_path, check=True, capture_output=True)

    assert [name for name in kept if not (tmp_path / name).exists()] == []
    assert [name for name in removed if (tmp_path / name).exists()] == []


def test_the_packaged_configuration_holds_nothing_of_conf_local(tmp_path):
    """`kedro package` left out only conf/local/*.yml: a credentials.yaml, a .json or a
    subfolder of conf/local went to every Airflow worker in dist/conf-medical_ct.tar.gz. The
    tarball `make package` writes has conf/local's empty folder only, and still loads."""
    from kedro.config import OmegaConfigLoader

    shutil.copy(PROJECT_ROOT / "Makefile", tmp_path / "Makefile")
    shutil.copytree(PROJECT_ROOT / "conf/base", tmp_path / "conf/base")
    secrets = ["credentials.yaml", "credentials.yml", "aws.json", "team/parameters.yml"]
    for name in secrets:
        (tmp_path / "conf/local" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "conf/local" / name).write_text("secret: SECRET\n")

    subprocess.run(["make", "conf-tarball"], cwd=tmp_path, check=True, capture_output=True)

    tarball = tmp_path / "dist/conf-medical_ct.tar.gz"
    with tarfile.open(tarball) as archive:
        names = archive.getnames()
    assert [name for name in names if name.startswith("conf/local/")] == []
    assert "conf/local" in names and "conf/base/parameters_lifecycle.yml" in names
    parameters = OmegaConfigLoader(str(tarball), base_env="base", default_run_env="local")
    assert parameters["parameters"]["rollback"]["reason"] is None
