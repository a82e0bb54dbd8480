"""What a version was trained on: its manifest, logged with it, and the rebuild from the stores."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medical_ct import lifecycle
from medical_ct.manifest import MANIFEST_COLUMNS, manifest_fingerprint
from medical_ct.registry import CHAMPION_ALIAS, MODEL_NAME, registered_versions
from medical_ct.shards import NpzDataset
from tests.conftest import (
    FAST_RUN_PARAMS,
    assert_ok,
    kedro,
    make_project,
    mlflow_client,
    project_env,
    read_model_input,
)

pytestmark = pytest.mark.e2e  # real servers and kedro runs

MANIFEST_ARTIFACT = "model_input/training_manifest.parquet"


@pytest.fixture
def project(trained_project, tmp_path) -> Path:
    """A copy of the trained project: these tests remove images from its raw store."""
    copy = tmp_path / "project"
    shutil.copytree(trained_project, copy)
    return copy


def champion_version(project: Path) -> str:
    client = mlflow_client(project)
    return str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS).version)


def test_the_version_s_run_logs_its_manifest_as_input_dataset_and_artifact(
    trained_project, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", project_env(trained_project)["MLFLOW_TRACKING_URI"])
    version = registered_versions(MANIFEST_ARTIFACT)[champion_version(trained_project)]
    fingerprint = version.tags[lifecycle.DATASET_FINGERPRINT]

    manifest = version.read_manifest()

    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert manifest_fingerprint(manifest) == fingerprint
    assert set(manifest["source"]) == {"raw"} and set(manifest["feedback_id"]) == {""}
    assert manifest["file"].str.match(r"^[A-Za-z]+/[^/]+\.jpeg$").all()
    train = read_model_input(f"{trained_project}/data", "train")
    assert list(manifest[manifest["split"] == "train"]["content_hash"]) == train["content_hashes"]
    assert version.tags[lifecycle.TRAIN_IMAGES_RAW] == str(len(train["labels"]))
    assert version.tags[lifecycle.TRAIN_IMAGES_FEEDBACK] == "0"

    run = mlflow_client(trained_project).get_run(version.run_id)
    (logged,) = [i for i in run.inputs.dataset_inputs if i.dataset.name == "medical_ct_model_input"]
    tags = {tag.key: tag.value for tag in logged.tags}
    assert tags["dataset_fingerprint"] == fingerprint
    assert tags["mlflow.data.context"] == "training"
    assert json.loads(logged.dataset.profile)["num_rows"] == len(manifest)


def test_a_version_s_manifest_rebuilds_its_model_input_with_the_same_fingerprint(project):
    version = champion_version(project)

    result = kedro(
        project, "run", "--pipeline", "rebuild", "--params", f"rebuild.version={version}"
    )

    assert_ok(result)
    rebuilt = NpzDataset(filepath=str(project / "data/05_model_input/rebuilt_model_input.npz"))
    rebuilt = rebuilt.load()
    for split in ("train", "validation", "test"):
        original = read_model_input(f"{project}/data", split)
        assert rebuilt[split]["content_hashes"] == original["content_hashes"]
        assert np.array_equal(rebuilt[split]["images"], original["images"])
        assert np.array_equal(rebuilt[split]["labels"], original["labels"])
    report = json.loads((project / "data/08_reporting/rebuild_report.json").read_text())
    assert report["fingerprint_matches"] is True
    tags = mlflow_client(project).get_model_version(MODEL_NAME, version).tags
    assert report["dataset_fingerprint"] == tags[lifecycle.DATASET_FINGERPRINT]


def test_a_rebuild_names_the_image_missing_from_the_store(project, monkeypatch):
    version = champion_version(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", project_env(project)["MLFLOW_TRACKING_URI"])
    manifest = registered_versions(MANIFEST_ARTIFACT)[version].read_manifest()
    removed = manifest[manifest["split"] == "test"]["file"].iloc[0]
    (project / "data/01_raw/mednist" / removed).unlink()

    result = kedro(
        project, "run", "--pipeline", "rebuild", "--params", f"rebuild.version={version}"
    )

    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0
    assert f"raw store: {removed} is missing" in output
    assert "1 of " in output and "Restore them" in output


def test_a_version_registered_by_an_evaluation_run_of_its_own_holds_its_manifest(
    tmp_path, sample_dir, monkeypatch
):
    """data_processing, training and evaluation as three `kedro run`s, so three MLflow runs:
    the one that registers the version must hold its manifest, or the version cannot be
    rebuilt and the next run cannot count new images against it."""
    project = make_project(tmp_path / "project", sample_dir)
    for pipeline in ("data_processing", "training", "evaluation"):
        assert_ok(kedro(project, "run", "--pipeline", pipeline, "--params", FAST_RUN_PARAMS))
    version = champion_version(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", project_env(project)["MLFLOW_TRACKING_URI"])
    details = registered_versions(MANIFEST_ARTIFACT)[version]

    manifest = details.read_manifest()

    assert manifest_fingerprint(manifest) == details.tags[lifecycle.DATASET_FINGERPRINT]
    run = mlflow_client(project).get_run(details.run_id)
    assert run.info.run_name == "evaluation"  # not data_processing's run, which logged it first
    inputs = [i for i in run.inputs.dataset_inputs if i.dataset.name == "medical_ct_model_input"]
    assert len(inputs) == 1
    result = kedro(
        project, "run", "--pipeline", "rebuild", "--params", f"rebuild.version={version}"
    )
    assert_ok(result)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("rebuild.version=abc", "rebuild: version must be a registered version number"),
        ("rebuild.version=999", "version 999 of medical_ct_classifier does not exist"),
    ],
)
def test_bad_rebuild_requests_are_refused_clearly(trained_project, params, message):
    result = kedro(trained_project, "run", "--pipeline", "rebuild", "--params", params)

    assert result.returncode != 0
    assert message in " ".join((result.stdout + result.stderr).split())


# ---- the lifecycle tags on their own ----
def test_previous_champion_skips_versions_rolled_back_from():
    tags = {
        "1": {},
        "2": {lifecycle.PREVIOUS_CHAMPION: "1"},
        "3": {lifecycle.PREVIOUS_CHAMPION: "2", lifecycle.ROLLED_BACK_AT: "t"},
        "4": {lifecycle.PREVIOUS_CHAMPION: "3"},
    }
    assert lifecycle.previous_champion("4", tags) == "2"
    assert lifecycle.previous_champion("2", tags) == "1"
    assert lifecycle.previous_champion("1", tags) is None


def test_rollback_tags_carry_the_data_rolled_back_from():
    current = {lifecycle.DATASET_FINGERPRINT: "f3", lifecycle.ROLLED_BACK_DATA: "4:f4"}
    target = {lifecycle.DATASET_FINGERPRINT: "f2", lifecycle.PREVIOUS_CHAMPION: "1"}

    from_tags, to_tags = lifecycle.rollback_tags("3", current, target, "why", "me", "now")

    assert from_tags[lifecycle.ROLLED_BACK_REASON] == "why"
    assert lifecycle.rolled_back_data(to_tags) == {"f4": "4", "f3": "3"}
    assert lifecycle.PREVIOUS_CHAMPION not in to_tags  # the target keeps its own history
    assert lifecycle.lineage({**target, **to_tags})["rolled_back_to"] == {
        "at": "now",
        "reason": "why",
        "by": "me",
        "from_version": "3",
    }


def test_decide_training_refuses_the_data_rolled_back_from_unless_told():
    from medical_ct.pipelines.training.nodes import decide_training
    from medical_ct.registry import RegisteredClassifier

    champion = RegisteredClassifier(
        model=None,
        version="2",
        class_names=[],
        tags={lifecycle.DATASET_FINGERPRINT: "f2", lifecycle.ROLLED_BACK_DATA: "3:f3"},
    )

    def decide(fingerprint, retrain):
        no_images = pd.DataFrame({"content_hash": [], "label": []})
        decision, _ = decide_training(fingerprint, no_images, champion, {}, retrain, 1)
        return decision

    assert decide("f3", False)["train"] is False
    assert "version 3 was trained on" in decide("f3", False)["reason"]
    assert decide("f3", True)["train"] is True
    assert decide("f4", False)["train"] is True  # no manifest to count: different data trains
    assert decide("f2", False)["train"] is False


def test_versions_registered_with_a_gzip_csv_manifest_are_still_read(tmp_path, monkeypatch):
    """Versions registered before the Parquet manifest logged a gzip CSV: rollback, rebuild
    and the training decision must still read it; a run with neither says so."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    legacy = pd.DataFrame({column: ["a", ""] for column in MANIFEST_COLUMNS})
    legacy.to_csv(tmp_path / "training_manifest.csv.gz", index=False, compression="gzip")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(MODEL_NAME)
    for logs_manifest in (True, False):
        run_id = client.create_run(experiment_id="0").info.run_id
        if logs_manifest:
            client.log_artifact(run_id, str(tmp_path / "training_manifest.csv.gz"), "model_input")
        client.set_terminated(run_id)
        client.create_model_version(MODEL_NAME, f"runs:/{run_id}/m", run_id)

    versions = registered_versions(MANIFEST_ARTIFACT)
    pd.testing.assert_frame_equal(versions["1"].read_manifest(), legacy)
    with pytest.raises(FileNotFoundError) as missing:
        versions["2"].read_manifest()
    assert "training_manifest.parquet" in str(missing.value)
    assert "training_manifest.csv.gz" in str(missing.value)
