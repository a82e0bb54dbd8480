"""Incremental runs on the local store: decoding reuses last run's pixels, unchanged data skips
training."""

import json

import pandas as pd
import pytest

from medical_ct import registry
from medical_ct.datasets import ImageFolderDataset, StoredFile
from medical_ct.pipelines.data_processing.nodes import decode_images
from medical_ct.pipelines.training.nodes import decide_training

from .conftest import CLASSES, FAST_RUN_PARAMS, assert_ok, kedro, mlflow_client


def stored_files(sample_dir, reads: list[str], count: int = 6) -> dict[str, StoredFile]:
    files = {}
    for path in sorted(sample_dir.glob("*/*.jpeg"))[:count]:
        key = f"{path.parent.name}/{path.name}"

        def read(path=path, key=key) -> bytes:
            reads.append(key)
            return path.read_bytes()

        files[key] = StoredFile(version=f"{path.stat().st_size}:v1", read=read)
    return files


def test_decoding_reads_only_new_or_changed_files(sample_dir):
    reads: list[str] = []
    files = stored_files(sample_dir, reads)
    files["Hand/broken.jpeg"] = StoredFile(version="3:v1", read=lambda: reads.append("b") or b"bad")
    first = decode_images(files, CLASSES)
    assert len(reads) == 7 and first["reused"] == 0

    reads.clear()
    changed = next(iter(files))
    files[changed] = StoredFile(version="new", read=files[changed].read)
    second = decode_images(files, CLASSES, previous=first)
    assert reads == [changed]
    assert second["reused"] == 6
    assert second["content_hashes"] == first["content_hashes"]
    assert (second["pixels"] == first["pixels"]).all()
    assert second["rejected"] == first["rejected"]


def test_decoding_ignores_a_previous_output_without_versions(sample_dir):
    reads: list[str] = []
    files = stored_files(sample_dir, reads, count=3)
    legacy = decode_images(files, CLASSES)
    del legacy["versions"]
    reads.clear()
    assert decode_images(files, CLASSES, previous=legacy)["reused"] == 0
    assert len(reads) == 3


def test_local_image_folder_versions_change_with_the_file(tmp_path):
    (tmp_path / "Hand").mkdir()
    image = tmp_path / "Hand/a.jpeg"
    image.write_bytes(b"one")
    before = ImageFolderDataset(path=str(tmp_path)).load()["Hand/a.jpeg"]
    image.write_bytes(b"three")
    after = ImageFolderDataset(path=str(tmp_path)).load()["Hand/a.jpeg"]
    assert before.version != after.version and after() == b"three"


CHAMPION = registry.RegisteredClassifier(
    model=None, version="3", class_names=CLASSES, tags={"dataset_fingerprint": "abc"}
)
TRAINED_ON = [(f"{n:064x}", "Hand") for n in range(20)]


def manifest(pairs: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(pairs, columns=["content_hash", "label"])


def versions(read_manifest=lambda: manifest(TRAINED_ON)) -> dict:
    version = registry.RegisteredVersion("3", None, {}, dict, read_manifest)
    return {"3": version}


def decide(fingerprint, champion, retrain, pairs=TRAINED_ON, minimum=10, **kwargs):
    decision, metric = decide_training(
        fingerprint, manifest(pairs), champion, versions(**kwargs), retrain, minimum
    )
    assert metric["training.new_images"]["value"] == (
        -1 if decision["new_images"] is None else decision["new_images"]
    )
    return decision


@pytest.mark.parametrize(
    ("champion", "fingerprint", "retrain", "train"),
    [
        (None, "abc", False, True),
        (CHAMPION, "abc", False, False),
        (CHAMPION, "abc", True, True),
    ],
)
def test_training_is_decided_by_the_champions_fingerprint(champion, fingerprint, retrain, train):
    assert decide(fingerprint, champion, retrain)["train"] is train


def test_fewer_new_images_than_min_new_images_wait_and_say_how_many():
    nine_new = TRAINED_ON + [(f"{n:064x}", "CXR") for n in range(100, 109)]

    decision = decide("def", CHAMPION, False, nine_new)

    assert decision["train"] is False and decision["new_images"] == 9
    assert "9 new or relabelled images" in decision["reason"]
    assert "min_new_images is 10" in decision["reason"] and "1 more" in decision["reason"]
    assert "set retrain_on_same_data=true" in decision["reason"]
    assert "training.retrain" not in decision["reason"]  # the parameter is top-level


def test_min_new_images_new_or_relabelled_images_train():
    relabelled = [(digest, "CXR") for digest, _ in TRAINED_ON[:4]]
    ten = TRAINED_ON[4:] + relabelled + [(f"{n:064x}", "CXR") for n in range(100, 106)]

    decision = decide("def", CHAMPION, False, ten)

    assert decision == {**decision, "train": True, "new_images": 10}


def test_a_champion_without_a_manifest_trains_on_different_data():
    def missing():
        raise FileNotFoundError("no manifest")

    decision = decide("def", CHAMPION, False, read_manifest=missing)

    assert decision["train"] is True and decision["new_images"] is None
    assert "no training manifest" in decision["reason"]


@pytest.mark.parametrize(
    ("retrain", "minimum", "message"),
    [
        ("yes", 10, "retrain_on_same_data must be true or false"),
        (False, 0, "min_new_images must be an integer >= 1"),
        (False, "10", "min_new_images must be an integer >= 1"),
    ],
)
def test_bad_decision_parameters_are_refused(retrain, minimum, message):
    with pytest.raises(ValueError, match=message):
        decide("abc", None, retrain, minimum=minimum)


def test_a_local_rerun_on_unchanged_data_skips_training(trained_project):
    client = mlflow_client(trained_project)
    versions = len(client.search_model_versions(f"name='{registry.MODEL_NAME}'"))
    champion = client.get_model_version_by_alias(registry.MODEL_NAME, registry.CHAMPION_ALIAS)
    result = kedro(trained_project, "run", "--params", FAST_RUN_PARAMS)
    assert_ok(result)
    assert "registering nothing" in " ".join((result.stdout + result.stderr).split())
    assert len(client.search_model_versions(f"name='{registry.MODEL_NAME}'")) == versions
    after = client.get_model_version_by_alias(registry.MODEL_NAME, registry.CHAMPION_ALIAS)
    assert after.version == champion.version
    promotion = json.loads((trained_project / "data/08_reporting/promotion.json").read_text())
    assert promotion["skipped"] is True
    report = json.loads((trained_project / "data/08_reporting/data_report.json").read_text())
    assert report["rejected_count"] == 0
    assert report["files_reused_from_last_run"] == report["raw_images_decoded"]
