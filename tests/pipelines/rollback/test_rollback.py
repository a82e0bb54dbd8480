"""Rolling back the champion: real `kedro run --pipeline rollback`, sqlite registry,
`bentoml serve`."""

import json
import logging
import shutil
import threading
import time
from pathlib import Path

import httpx
import mlflow
import pytest
import yaml

from medical_ct import lifecycle, registry
from medical_ct.manifest import manifest_fingerprint
from medical_ct.registry import CHAMPION_ALIAS, MODEL_NAME
from tests.conftest import (
    FAST_RUN_PARAMS,
    assert_ok,
    bentoml_server,
    kedro,
    mlflow_client,
    project_env,
    wait_ready,
)

pytestmark = pytest.mark.e2e  # real servers and kedro runs

MANIFEST_ARTIFACT = "model_input/training_manifest.parquet"
POLL_INTERVAL_S = 2
FOLLOW_BOUND_S = POLL_INTERVAL_S + 5  # a poll, then loading the model
REASON = "Hand recall dropped in production"
GATE = {"min_accuracy": 0.7, "min_improvement": 0.0}  # FAST_RUN_PARAMS' min_accuracy
TRAINED_UNDER = ",".join(  # FAST_RUN_PARAMS' gate, which the trained versions passed
    param for param in FAST_RUN_PARAMS.split(",") if param.startswith("champion_gate.")
)


def champion(project: Path) -> str:
    return str(
        mlflow_client(project).get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS).version
    )


def output_of(result) -> str:
    return " ".join((result.stdout + result.stderr).split())


@pytest.fixture(scope="module")
def project(trained_project, tmp_path_factory, sample_dir) -> dict:
    """A copy of the trained project, then a second promotion trained on new data.

    The new data is one corrected label in the accepted feedback store, with the record the
    review writes, so the second version's data differs from the first's and includes feedback.
    """
    copy = tmp_path_factory.mktemp("rollback") / "project"
    shutil.copytree(trained_project, copy)
    first = champion(copy)
    image = sorted((sample_dir / "Hand").iterdir())[0]
    accepted_as = f"CXR/{image.stem}.jpeg"
    (copy / "data/01_raw/feedback_accepted/images/CXR").mkdir(parents=True)
    shutil.copy(image, copy / "data/01_raw/feedback_accepted/images" / accepted_as)
    (copy / "data/01_raw/feedback_accepted/records").mkdir(parents=True)
    record = {"feedback_id": "CXR-test", "accepted_as": accepted_as, "label": "CXR"}
    record |= {"decision": "accept", "reviewer": "alice"}
    (copy / "data/01_raw/feedback_accepted/records/CXR-test.json").write_text(json.dumps(record))
    started = time.monotonic()
    params = f"{FAST_RUN_PARAMS},champion_gate.min_improvement=-1,min_new_images=1"
    assert_ok(kedro(copy, "run", "--params", params))
    second = champion(copy)
    assert second != first, "the retraining on new data was promoted"
    return {"path": copy, "first": first, "second": second, "train_s": time.monotonic() - started}


def test_second_version_was_promoted_with_its_lineage(project, monkeypatch):
    path = project["path"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", project_env(path)["MLFLOW_TRACKING_URI"])
    versions = registry.registered_versions(MANIFEST_ARTIFACT)
    second = versions[project["second"]]
    assert second.tags[lifecycle.PREVIOUS_CHAMPION] == project["first"]
    assert "min_improvement" in second.tags[lifecycle.PROMOTED_REASON]
    assert int(second.tags[lifecycle.TRAIN_IMAGES_RAW]) > 100

    manifest = second.read_manifest()
    feedback = manifest[manifest["source"] == "feedback"].to_dict("records")
    assert len(feedback) == 1
    assert feedback[0]["feedback_id"] == "CXR-test" and feedback[0]["label"] == "CXR"
    assert feedback[0]["review_decision"] == "accept"
    in_train = int(feedback[0]["split"] == "train")
    assert second.tags[lifecycle.TRAIN_IMAGES_FEEDBACK] == str(in_train)
    assert manifest_fingerprint(manifest) == second.tags[lifecycle.DATASET_FINGERPRINT]
    first_manifest = versions[project["first"]].read_manifest()
    assert manifest_fingerprint(first_manifest) != second.tags[lifecycle.DATASET_FINGERPRINT]


@pytest.fixture(scope="module")
def rolled_back(project, sample_dir) -> dict:
    """`kedro run --pipeline rollback` (to the previous champion) while a served model answers
    /predict from four clients; what they saw, and how long the service took to follow."""
    path, first = project["path"], project["first"]
    image = sorted((sample_dir / "AbdomenCT").iterdir())[0].read_bytes()
    with bentoml_server(path, MEDICAL_CT_MODEL_POLL_INTERVAL_S=str(POLL_INTERVAL_S)) as url:
        wait_ready(url)
        served_before = httpx.get(f"{url}/model").json()["version"]
        seen, failures, stop = [], [], threading.Event()

        def keep_predicting() -> None:
            with httpx.Client(base_url=url, timeout=30) as session:
                while not stop.is_set():
                    response = session.post("/predict", files={"image": ("a.jpeg", image)})
                    if response.status_code == 200:
                        seen.append((time.monotonic(), response.json()["model_version"]))
                    else:
                        failures.append(f"{response.status_code} {response.text}")

        moved = []

        def watch_alias() -> None:  # when the registry's alias moved, to a tenth of a second
            registry_client = mlflow_client(path)
            while not stop.is_set() and not moved:
                alias = registry_client.get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS)
                if str(alias.version) == first:
                    moved.append(time.monotonic())
                time.sleep(0.1)

        threads = [threading.Thread(target=keep_predicting) for _ in range(4)]
        threads.append(threading.Thread(target=watch_alias))
        for thread in threads:
            thread.start()
        try:
            started = time.monotonic()
            # the gate the versions were trained under (FAST_RUN_PARAMS): a rollback refuses
            # a target whose recorded figures fail it
            params = f"rollback.reason={REASON},{TRAINED_UNDER}"
            result = kedro(path, "run", "--pipeline", "rollback", "--params", params)
            assert_ok(result)
            finished = time.monotonic()
            # Each worker polls on its own: keep asking until every one must have followed.
            while not moved and time.monotonic() - finished < 10:
                time.sleep(0.1)
            while moved and time.monotonic() < moved[0] + FOLLOW_BOUND_S + 2:
                time.sleep(0.1)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        moved_at = moved[0]
        old_answers = [at for at, version in seen if version != first]
        served_at = max(old_answers) if old_answers else moved_at
        followed_s = served_at - moved_at
        described = httpx.get(f"{url}/model").json()
    print(
        f"\nrollback run {finished - started:.1f} s; the last answer from the old version came "
        f"{followed_s:.1f} s after the alias moved; "
        f"{len(seen)} predictions, {len(failures)} failed"
    )
    return {
        "served_before": served_before,
        "seen": seen,
        "failures": failures,
        "served_at": served_at,
        "followed_s": followed_s,
        "described": described,
    }


def test_the_service_follows_a_rollback_within_the_poll_interval_and_no_request_fails(
    project, rolled_back
):
    first = project["first"]
    assert rolled_back["served_before"] == project["second"]
    assert rolled_back["failures"] == []
    # served_at is the last answer from the old version: every worker had followed by then.
    assert rolled_back["followed_s"] <= FOLLOW_BOUND_S
    settled = rolled_back["served_at"]
    after = [version for at, version in rolled_back["seen"] if at > settled]
    assert len(after) > 10 and set(after) == {first}
    assert champion(project["path"]) == first


def test_get_model_tells_the_served_version_s_lineage(project, rolled_back):
    described = rolled_back["described"]
    lineage = described["lineage"]
    assert described["version"] == project["first"]
    assert lineage["rolled_back_to"]["reason"] == REASON
    assert lineage["rolled_back_to"]["from_version"] == project["second"]
    assert lineage["rolled_back_to"]["by"] and lineage["rolled_back_to"]["at"]
    assert lineage["promoted"]["at"] and "min_accuracy" in lineage["promoted"]["reason"]
    assert lineage["trained_on"]["raw"] > 100 and lineage["trained_on"]["feedback"] == 0


def test_the_alias_history_records_each_move_with_its_reason(project, rolled_back):
    path, first, second = project["path"], project["first"], project["second"]
    client = mlflow_client(path)
    experiment = client.get_experiment_by_name("medical_ct")
    history = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.{lifecycle.MOVE_KIND} = 'rollback'"
    )
    assert len(history) == 1
    run = history[0]
    assert run.data.tags[lifecycle.MOVE_FROM] == second
    assert run.data.tags[lifecycle.MOVE_TO] == first
    assert run.data.params["rollback.reason"] == REASON
    record_path = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id,
        artifact_path="reports/rollback.json",
        tracking_uri=project_env(path)["MLFLOW_TRACKING_URI"],
    )
    record = json.loads(Path(record_path).read_text())
    assert record["from_version"] == second and record["to_version"] == first
    assert record["reason"] == REASON and record["by"] and record["at"]
    # rollback.by and to_version defaulted (the run's parameters say None): the tags say who
    # and which version, so a search finds the run
    by = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{lifecycle.MOVE_BY}` = '{record['by']}' "
        f"and tags.`{lifecycle.MOVE_TO}` = '{first}'",
    )
    assert [found.info.run_id for found in by] == [run.info.run_id]
    promotions = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.{lifecycle.MOVE_KIND} = 'promotion'"
    )
    assert {r.data.tags[lifecycle.MOVE_TO] for r in promotions} >= {first, second}
    rolled_from = client.get_model_version(MODEL_NAME, second).tags
    assert rolled_from[lifecycle.ROLLED_BACK_REASON] == REASON
    rolled_to = client.get_model_version(MODEL_NAME, first).tags
    assert lifecycle.rolled_back_data(rolled_to) == {
        rolled_from[lifecycle.DATASET_FINGERPRINT]: second
    }


def test_the_next_run_does_not_retrain_on_the_data_rolled_back_from(project, rolled_back):
    path = project["path"]
    assert champion(path) == project["first"]
    versions_before = len(mlflow_client(path).search_model_versions(f"name='{MODEL_NAME}'"))

    result = kedro(path, "run", "--params", FAST_RUN_PARAMS)

    assert_ok(result)
    assert f"is the one version {project['second']} was trained on" in output_of(result)
    assert champion(path) == project["first"]
    assert len(mlflow_client(path).search_model_versions(f"name='{MODEL_NAME}'")) == (
        versions_before
    )


def test_rollback_to_a_version_that_does_not_exist_is_refused(project):
    path = project["path"]
    before = champion(path)

    result = kedro(
        path,
        "run",
        "--pipeline",
        "rollback",
        "--params",
        "rollback.to_version=999,rollback.reason=x",
    )

    assert result.returncode != 0
    assert "version 999 of medical_ct_classifier does not exist" in output_of(result)
    assert champion(path) == before


def test_rollback_to_a_version_without_serving_metadata_is_refused(project, tmp_path, monkeypatch):
    """A version whose model lacks class names and the preprocessing spec (as one logged by
    hand, or before the metadata existed) cannot be served: the champion must not move."""
    path = project["path"]
    before = champion(path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", project_env(path)["MLFLOW_TRACKING_URI"])
    model = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{MODEL_NAME}/{before}", dst_path=str(tmp_path / "model")
        )
    )
    mlmodel = yaml.safe_load((model / "MLmodel").read_text())
    mlmodel.pop("metadata")
    (model / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    incomplete = mlflow_client(path).create_model_version(MODEL_NAME, str(model), None)

    result = kedro(
        path,
        "run",
        "--pipeline",
        "rollback",
        "--params",
        f"rollback.to_version={incomplete.version},rollback.reason=x",
    )

    assert result.returncode != 0
    output = output_of(result)
    assert f"version {incomplete.version} lacks what the service needs" in output
    assert "class_names" in output and "preprocessing" in output
    assert champion(path) == before


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("rollback.to_version=abc,rollback.reason=x", "to_version must be a registered version"),
        ("rollback.to_version=0,rollback.reason=x", "to_version must be a registered version"),
        ("rollback.to_version=1", "reason is required"),
        ("rollback.reason=x,rollback.force=maybe", "force must be true or false"),
    ],
)
def test_bad_rollback_parameters_fail_before_anything_moves(project, params, message):
    path = project["path"]
    before = champion(path)

    result = kedro(path, "run", "--pipeline", "rollback", "--params", params)

    output = output_of(result)
    assert result.returncode != 0
    assert message in output
    assert "Running node" not in output, "parameters are checked before the first node"
    assert champion(path) == before


def test_rollback_and_rebuild_are_not_part_of_the_default_pipeline():
    from kedro.framework.project import configure_project

    configure_project("medical_ct")
    from medical_ct.pipeline_registry import register_pipelines

    pipelines = register_pipelines()
    default = {node.name for node in pipelines["__default__"].nodes}
    assert "register_and_promote" in default
    assert "roll_back_champion" not in default and "rebuild_model_input" not in default
    assert {node.name for node in pipelines["rollback"].nodes} == {"roll_back_champion"}


# ---- what a rollback must not leave behind: an unloadable champion, false history ----
@pytest.fixture
def two_versions(trained_project, tmp_path, monkeypatch) -> Path:
    """A copy of the trained project (champion: version 1) with a version 2 registered from
    version 1's model and run (so it loads and has a manifest), never champion."""
    copy = tmp_path / "project"
    shutil.copytree(trained_project, copy)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", project_env(copy)["MLFLOW_TRACKING_URI"])
    client = mlflow_client(copy)
    first = client.get_model_version(MODEL_NAME, champion(copy))
    client.create_model_version(MODEL_NAME, first.source, first.run_id)
    return copy


def all_tags(project: Path) -> dict[str, dict[str, str]]:
    client = mlflow_client(project)
    return {
        str(v.version): dict(v.tags) for v in client.search_model_versions(f"name='{MODEL_NAME}'")
    }


def test_rollback_to_a_version_whose_model_cannot_be_loaded_is_refused(two_versions, tmp_path):
    """Its MLmodel (metadata) reads fine, its model file is gone: the service could not load
    it, so the champion must not move to it."""
    path = two_versions
    before, tags_before = champion(path), all_tags(path)
    model = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{MODEL_NAME}/{before}", dst_path=str(tmp_path / "model")
        )
    )
    (model / "data/model.pt2").unlink()
    broken = mlflow_client(path).create_model_version(MODEL_NAME, str(model), None).version
    # recorded as registration records it: a version without test_accuracy is refused before
    # its model is loaded (test_rollback_to_a_version_whose_registration_was_interrupted...)
    set_tags(path, broken, {"test_accuracy": "0.990000"})

    params = f"rollback.to_version={broken},rollback.reason=x"
    result = kedro(path, "run", "--pipeline", "rollback", "--params", params)

    output = output_of(result)
    assert result.returncode != 0
    assert f"version {broken}'s model cannot be loaded" in output and "model.pt2" in output
    assert "roll back to another version with rollback.to_version" in output
    assert champion(path) == before
    assert {v: all_tags(path)[v] for v in tags_before} == tags_before


def test_a_rollback_whose_alias_move_fails_leaves_no_history_of_it(two_versions):
    """The registry's database refuses the alias move (a trigger: a real sqlite failure, as
    'database is locked' is) after the tags were written: they are put back as they were."""
    import sqlite3

    path = two_versions
    # recorded as registration records it: a version without test_accuracy is refused before
    # the move is tried (test_rollback_to_a_version_whose_registration_was_interrupted...)
    set_tags(path, "2", {"test_accuracy": "0.990000"})
    before, tags_before = champion(path), all_tags(path)
    with sqlite3.connect(path / "mlflow.db") as database:
        for event in ("INSERT", "UPDATE"):
            database.execute(
                f"CREATE TRIGGER refuse_alias_{event.lower()} BEFORE {event} ON "
                "registered_model_aliases BEGIN SELECT RAISE(ABORT, 'alias moves refused'); END"
            )

    result = kedro(
        path, "run", "--pipeline", "rollback", "--params", "rollback.to_version=2,rollback.reason=x"
    )

    output = output_of(result)
    assert result.returncode != 0
    assert "alias moves refused" in output
    assert f"nothing moved, champion stays version {before}" in output
    assert "the versions' tags are as they were" in output
    assert champion(path) == before
    assert all_tags(path) == tags_before


def test_a_rollback_refuses_to_replace_a_champion_promoted_since_it_was_planned(two_versions):
    """Planned from version 2; the weekly run promotes version 3 before the move is applied:
    the move is refused, untagged, and says who moved the champion."""
    from kedro.io import DatasetError

    from medical_ct.datasets import ChampionAliasDataset, RegisteredVersionsDataset
    from medical_ct.pipelines.rollback.nodes import roll_back_champion

    path = two_versions
    client = mlflow_client(path)
    registry.apply_champion_move(lifecycle.promotion_move("2", "1", "second"))
    versions = RegisteredVersionsDataset(manifest_artifact=MANIFEST_ARTIFACT).load()
    move, _ = roll_back_champion(versions, "2", {"reason": "bad v2", "by": "alice"}, GATE)
    assert (move["from_version"], move["to_version"]) == ("2", "1")
    source = client.get_model_version(MODEL_NAME, "1")
    third = str(client.create_model_version(MODEL_NAME, source.source, source.run_id).version)
    registry.apply_champion_move(lifecycle.promotion_move(third, "2", "weekly gate"))
    tags_before = all_tags(path)

    with pytest.raises(DatasetError) as refused:
        ChampionAliasDataset().save(move)  # what the rollback run's save does

    assert isinstance(refused.value.__cause__, registry.ChampionMovedError)
    message = str(refused.value.__cause__)
    assert f"champion is version {third}, not version 2" in message
    assert "promoted by the champion gate" in message and "weekly gate" in message
    assert "run the rollback again" in message
    assert champion(path) == third
    assert all_tags(path) == tags_before
    with pytest.raises(registry.ChampionMovedError):  # a promotion planned from an old champion
        registry.apply_champion_move(lifecycle.promotion_move("1", "2", "stale"))
    assert champion(path) == third


def test_rollback_to_a_version_the_gate_refused_needs_force(two_versions):
    """to_version=2 typed for 1: version 2 scored 0.27 on its test split, far below what the
    gate promotes, and the champion moved to it without a word. rollback.force=true still
    rolls back to it (an expert's call), with a warning."""
    from medical_ct.datasets import RegisteredVersionsDataset
    from medical_ct.pipelines.rollback.nodes import roll_back_champion

    path = two_versions
    before, tags_before = champion(path), all_tags(path)
    mlflow_client(path).set_model_version_tag(MODEL_NAME, "2", "test_accuracy", "0.270000")
    tags_before["2"]["test_accuracy"] = "0.270000"

    params = "rollback.to_version=2,rollback.reason=x,champion_gate.min_accuracy=0.9"
    result = kedro(path, "run", "--pipeline", "rollback", "--params", params)

    output = output_of(result)
    assert result.returncode != 0
    assert (
        "version 2's recorded test accuracy 0.2700 (tag test_accuracy) is below "
        "champion_gate.min_accuracy 0.9000" in output
    )
    assert "set rollback.force=true to roll back to it anyway" in output
    assert champion(path) == before
    assert all_tags(path) == tags_before
    versions = RegisteredVersionsDataset(manifest_artifact=MANIFEST_ARTIFACT).load()
    rollback = {"to_version": 2, "reason": "x", "by": "alice", "force": True}
    move, _ = roll_back_champion(versions, before, rollback, GATE | {"min_accuracy": 0.9})
    assert move["to_version"] == "2"


def set_tags(project: Path, version: str, tags: dict[str, str]) -> None:
    client = mlflow_client(project)
    for key, value in tags.items():
        client.set_model_version_tag(MODEL_NAME, version, key, value)


def test_rollback_to_a_version_with_a_class_the_gate_refuses_is_refused_naming_it(two_versions):
    """Version 2's accuracy passes, but it recorded a Hand recall of 0.4: the gate refuses
    such a model today, and the rollback checked only the accuracy and served it."""
    path = two_versions
    set_tags(path, "2", {"test_accuracy": "0.950000", "test_ece": "0.010000"})
    set_tags(path, "2", {"test_recall.Hand": "0.400000", "test_recall.CXR": "1.000000"})
    before, tags_before = champion(path), all_tags(path)

    gate = "champion_gate.min_accuracy=0.9,champion_gate.min_class_recall=0.9"
    params = f"rollback.to_version=2,rollback.reason=x,{gate},champion_gate.max_ece=0.02"
    result = kedro(path, "run", "--pipeline", "rollback", "--params", params)

    output = output_of(result)
    assert result.returncode != 0
    assert (
        "version 2's recorded test recall of class Hand 0.4000 (tag test_recall.Hand) is "
        "below champion_gate.min_class_recall 0.9000: the gate would refuse it today" in output
    )
    assert "class CXR" not in output and "does not record" not in output
    assert "set rollback.force=true to roll back to it anyway" in output
    assert champion(path) == before
    assert all_tags(path) == tags_before


def test_rollback_to_a_version_above_max_ece_needs_force_and_warns(two_versions, caplog):
    """A recorded calibrated ECE of 0.3 (answers given with 90% confidence right 60% of the
    time) fails max_ece: refused, and rollback.force=true rolls back with a warning."""
    from medical_ct.datasets import RegisteredVersionsDataset
    from medical_ct.pipelines.rollback.nodes import RollbackRefusedError, roll_back_champion

    path = two_versions
    set_tags(path, "2", {"test_accuracy": "0.950000", "test_ece": "0.300000"})
    set_tags(path, "2", {"test_recall.Hand": "0.990000"})
    versions = RegisteredVersionsDataset(manifest_artifact=MANIFEST_ARTIFACT).load()
    gate = GATE | {"min_class_recall": 0.9, "max_ece": 0.02}
    rollback = {"to_version": 2, "reason": "x", "by": "alice"}
    ece = (
        "version 2's recorded test ECE 0.3000 (tag test_ece) is above champion_gate.max_ece 0.0200"
    )

    with pytest.raises(RollbackRefusedError) as refused:
        roll_back_champion(versions, "1", rollback, gate)
    assert ece in str(refused.value) and "rollback.force=true" in str(refused.value)

    with caplog.at_level(logging.WARNING, logger="medical_ct.pipelines.rollback.nodes"):
        move, _ = roll_back_champion(versions, "1", rollback | {"force": True}, gate)
    registry.apply_champion_move(move)
    assert f"{ece}; rolling back to it as rollback.force=true asks" in caplog.text
    assert "does not record" not in caplog.text
    assert champion(path) == "2"


def test_a_version_registered_before_ece_and_recalls_were_recorded_is_checked_on_accuracy(
    two_versions, caplog
):
    """Versions registered before this check record test_accuracy alone: not refused for the
    figures they lack, checked on the one they have, and the log says what was not checked."""
    from medical_ct.datasets import RegisteredVersionsDataset
    from medical_ct.pipelines.rollback.nodes import RollbackRefusedError, roll_back_champion

    path = two_versions
    set_tags(path, "2", {"test_accuracy": "0.950000"})
    versions = RegisteredVersionsDataset(manifest_artifact=MANIFEST_ARTIFACT).load()
    strict = GATE | {"min_accuracy": 0.9, "min_class_recall": 0.99, "max_ece": 0.01}
    rollback = {"to_version": 2, "reason": "x", "by": "alice"}

    with caplog.at_level(logging.WARNING, logger="medical_ct.pipelines.rollback.nodes"):
        move, _ = roll_back_champion(versions, "1", rollback, strict)

    assert move["to_version"] == "2"
    assert (
        "Version 2 does not record test_ece, test_recall.<class> (missing or not a number: "
        "registered before the gate's figures were all recorded, or by hand): checked against "
        "the champion gate on test_accuracy only" in caplog.text
    )
    with pytest.raises(RollbackRefusedError) as refused:
        roll_back_champion(versions, "1", rollback, strict | {"min_accuracy": 0.97})
    assert "recorded test accuracy 0.9500 (tag test_accuracy) is below" in str(refused.value)
    assert "does not record test_ece, test_recall.<class>" in str(refused.value)


def test_a_rollback_run_again_after_it_landed_moves_nothing(two_versions):
    """Killed after the alias moved (no rollback.json, its MLflow run left running), the
    rollback looked failed; the same command again rolled back once more, from the version
    just restored to the one before it (production hunt of 2026-12-05)."""
    from medical_ct.datasets import RegisteredVersionsDataset
    from medical_ct.pipelines.rollback.nodes import RollbackRefusedError, roll_back_champion
    from medical_ct.registry import apply_champion_move

    path = two_versions
    mlflow_client(path).set_model_version_tag(MODEL_NAME, "2", "test_accuracy", "1.0")
    versions = RegisteredVersionsDataset(manifest_artifact=MANIFEST_ARTIFACT).load()
    landed = {"to_version": 2, "reason": "bad labels", "by": "alice"}
    move, _ = roll_back_champion(versions, champion(path), landed, GATE)
    apply_champion_move(move)
    versions = RegisteredVersionsDataset(manifest_artifact=MANIFEST_ARTIFACT).load()
    tags_before = all_tags(path)

    again = {"reason": "bad labels", "by": "alice"}
    with pytest.raises(RollbackRefusedError) as refused:
        roll_back_champion(versions, "2", again, GATE)

    assert str(refused.value).startswith(
        "version 2 is champion already by this rollback: rolled back to from version 1 at "
    )
    assert "nothing moved. To roll back further, name the version" in str(refused.value)
    assert champion(path) == "2" and all_tags(path) == tags_before
    with pytest.raises(RollbackRefusedError, match="has no previous champion on record"):
        roll_back_champion(versions, "2", {**again, "reason": "another reason"}, GATE)


def test_rollback_to_a_version_whose_registration_was_interrupted_needs_force(two_versions, caplog):
    """A kill between registering version 2 and tagging it left it with no tags, as here: with
    no recorded figure the gate check let it through, and the champion moved to a model that
    scored 0.28 while its retry (the same model, tagged) was refused. Refused, saying what it
    may be and where to look; rollback.force=true rolls back to it with a warning."""
    from medical_ct.datasets import RegisteredVersionsDataset
    from medical_ct.pipelines.rollback.nodes import roll_back_champion

    path = two_versions
    before, tags_before = champion(path), all_tags(path)
    assert lifecycle.TEST_ACCURACY not in tags_before["2"]
    run_id = mlflow_client(path).get_model_version(MODEL_NAME, "2").run_id

    params = "rollback.to_version=2,rollback.reason=x"
    result = kedro(path, "run", "--pipeline", "rollback", "--params", params)

    output = output_of(result)
    assert result.returncode != 0
    assert (
        "version 2 records no test accuracy (tag test_accuracy missing or not a number): it may "
        "be a version whose registration was interrupted (registered, then killed before its "
        "tags were written: no recorded figures)" in output
    )
    assert (
        f"See what it is in the MLflow UI: version 2 of {MODEL_NAME} (its tags) and its run "
        f"{run_id} (what it logged)" in output
    )
    assert f"The champion stays version {before}" in output
    assert "set rollback.force=true to roll back to it anyway" in output
    assert champion(path) == before
    assert all_tags(path) == tags_before
    versions = RegisteredVersionsDataset(manifest_artifact=MANIFEST_ARTIFACT).load()
    rollback = {"to_version": 2, "reason": "x", "by": "alice", "force": True}
    with caplog.at_level(logging.WARNING, logger="medical_ct.pipelines.rollback.nodes"):
        move, _ = roll_back_champion(versions, before, rollback, GATE)
    assert move["to_version"] == "2"
    assert "version 2 records no test accuracy" in caplog.text
    assert "rolling back to it as rollback.force=true asks" in caplog.text
