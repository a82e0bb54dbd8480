"""Incremental runs on the local store: decoding reuses last run's pixels, unchanged data skips
training."""

import gc
import json
import logging
import os
import pickle
import re
import weakref

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from kedro.io import DatasetError

from medical_ct import registry
from medical_ct.datasets import ImageFolderDataset, StoredFile
from medical_ct.pipelines.data_processing.nodes import build_model_input, decode_images
from medical_ct.pipelines.training.nodes import decide_training
from medical_ct.preprocessing import PREPROCESSING_SPEC
from medical_ct.shards import (
    INDEX_DTYPES,
    ModelInputDataset,
    NpzDataset,
    ShardedImages,
    ShardedImagesDataset,
)
from tests.conftest import (
    CLASSES,
    FAST_RUN_PARAMS,
    add_change_and_delete,
    assert_ok,
    file_size_limit,
    kedro,
    make_project,
    mlflow_client,
    model_input_rows,
    seed_feedback,
)

RESCAN = "data_processing.full_rescan=true"


def stored_files(sample_dir, reads: list[str], count: int = 6) -> dict[str, StoredFile]:
    files = {}
    for path in sorted(sample_dir.glob("*/*.jpeg"))[:count]:
        key = f"{path.parent.name}/{path.name}"

        def read(path=path, key=key) -> bytes:
            reads.append(key)
            return path.read_bytes()

        files[key] = StoredFile(version=f"{path.stat().st_size}:v1", read=read)
    return files


PARAMS = {
    "classes": CLASSES,
    "split": {"validation_fraction": 0.2, "test_fraction": 0.2},
    "shard_images": 4,
}


def next_run(store: ShardedImagesDataset) -> ShardedImagesDataset:
    """``store`` as the next run opens it: Kedro released it, so it keeps nothing it saved and
    loads read its files."""
    store.release()
    return store


def shard_files(folder) -> dict[str, float]:
    return {path.name: path.stat().st_mtime_ns for path in (folder / "shards").glob("*.npy")}


def test_a_rerun_reads_decodes_and_writes_only_new_or_changed_files(sample_dir, tmp_path):
    reads: list[str] = []
    files = stored_files(sample_dir, reads, count=10)
    files["Hand/broken.jpeg"] = StoredFile(version="3:v1", read=lambda: reads.append("b") or b"bad")
    store = ShardedImagesDataset(path=str(tmp_path / "decoded"))
    assert store.load() is None
    first = decode_images(files, store.load(), PARAMS)
    store.save(first)
    assert len(reads) == 11 and first["reused"] == 0
    before = shard_files(tmp_path / "decoded")
    assert len(before) == 3  # 10 images, 4 per shard

    reads.clear()
    changed = sorted(files)[0]
    files[changed] = StoredFile(version="new", read=files[changed].read)
    added = stored_files(sample_dir, reads, count=12)
    files.update({name: added[name] for name in sorted(added)[10:]})
    second = decode_images(files, next_run(store).load(), PARAMS)
    store.save(second)

    assert sorted(reads) == sorted([changed, *sorted(added)[10:]])
    assert second["reused"] == 10  # 9 images and the broken file
    after = shard_files(tmp_path / "decoded")
    assert {name: after[name] for name in before} == before, "an old shard was rewritten"
    assert len(after) == 4  # one new shard holds the 3 files read again
    again = next_run(store).load()
    fresh = decode_images(files, None, PARAMS)
    assert again["content_hashes"] == fresh["content_hashes"] == second["content_hashes"]
    rows = np.arange(len(fresh["labels"]))
    assert np.array_equal(again.pixels_of(rows), fresh.pixels_of(rows))
    assert again["rejected"] == first["rejected"]


def test_what_a_rerun_makes_does_not_keep_last_runs_index_or_the_decoded_sets_alive(
    sample_dir, tmp_path
):
    """Last run's index is read only to be joined with the listing: the decoded set and the
    model input made from it keep loaders of its shards, not it (a loader bound to the set
    held its index, 200 MiB at a million images, as long as what it made lived)."""
    every = sorted(stored_files(sample_dir, [], count=240).items())
    files = dict(every[::20])  # two of each class
    store = ShardedImagesDataset(path=str(tmp_path / "decoded"))
    store.save(decode_images(files, None, PARAMS))
    previous = next_run(store).load()
    files.update(every[1::40])  # new in the rerun: one of each class
    decoded = decode_images(files, previous, PARAMS)
    model_input = build_model_input(decoded, decode_images({}, None, PARAMS), PARAMS)
    alive = [weakref.ref(previous), weakref.ref(decoded)]
    del previous, decoded
    gc.collect()
    assert [ref() for ref in alive] == [None, None]
    fresh = build_model_input(
        decode_images(files, None, PARAMS), decode_images({}, None, PARAMS), PARAMS
    )
    for split, again in zip(model_input[:3], fresh[:3], strict=True):
        assert np.array_equal(split["images"], again["images"])  # every shard still readable


def test_a_save_cut_short_leaves_no_half_file_and_the_next_one_completes(sample_dir, tmp_path):
    """A shard is named by its content: half a shard left by a save cut short (a full disk, a
    killed run) was kept by the next save of the same pixels, which found its name taken, and
    the index then named a shard that could not be read. A save writes each file whole or not
    at all; what a killed run left is deleted by the next write of that file."""
    decoded = decode_images(stored_files(sample_dir, [], count=12), None, PARAMS)
    store = ShardedImagesDataset(path=str(tmp_path / "decoded"))
    with file_size_limit(8 * 1024), pytest.raises(DatasetError, match="File too large"):
        store.save(decoded)
    assert [path for path in (tmp_path / "decoded").rglob("*") if path.is_file()] == []
    killed = tmp_path / "decoded/index.parquet.0dead0ff.partial"  # a run killed mid-write
    killed.write_bytes(b"PAR1")
    store.save(decoded)
    assert not killed.exists()
    again = next_run(store).load()
    rows = np.arange(len(decoded["labels"]))
    assert np.array_equal(again.pixels_of(rows), decoded.pixels_of(rows))


def test_a_rerun_follows_a_change_of_classes_both_ways(sample_dir, tmp_path):
    """A file rejected for its class last run is decoded once its class is accepted, and a
    decoded file whose class is no longer accepted is rejected: only bytes-based verdicts and
    decoded pixels are reused."""
    reads: list[str] = []
    files = {
        key: stored
        for key, stored in stored_files(sample_dir, reads, count=1000).items()
        if key.split("/")[0] in ("CXR", "Hand", "HeadCT") and key.endswith(("1.jpeg", "2.jpeg"))
    }
    without_hand = {**PARAMS, "classes": [name for name in CLASSES if name != "Hand"]}
    first = decode_images(files, None, without_hand)
    hands = sorted(file for file in files if file.startswith("Hand/"))
    assert hands and [r["file"] for r in first["rejected"]] == hands

    reads.clear()
    second = decode_images(files, first, PARAMS)
    assert sorted(reads) == hands and not second["rejected"]
    assert second["content_hashes"] == decode_images(files, None, PARAMS)["content_hashes"]

    third = decode_images(files, second, without_hand)
    assert [(r["file"], r["reason"]) for r in third["rejected"]] == [
        (hand, "unknown class 'Hand'") for hand in hands
    ]


def test_a_rerun_over_an_index_out_of_file_order_still_places_every_row(sample_dir):
    """The rerun's index is in file order whatever order last run's was saved in (this code
    saves it in file order; the merge sorts by file either way)."""
    files = stored_files(sample_dir, [], count=12)
    names = sorted(files)
    first = decode_images({name: files[name] for name in names[1::2]}, None, PARAMS)
    shuffled = ShardedImages(
        first.index.sample(frac=1, random_state=0), first.shards, first.new_shards
    )
    assert shuffled.index["file"].tolist() != sorted(shuffled.index["file"])

    rerun = decode_images(files, shuffled, PARAMS)
    assert rerun["reused"] == 6
    assert rerun["files"] == names
    assert rerun["content_hashes"] == decode_images(files, None, PARAMS)["content_hashes"]


def test_an_empty_decoded_set_reads_back_typed_and_keeps_the_model_input_in_arrow_strings(
    sample_dir, tmp_path
):
    """An empty index's text columns have no type in Parquet; read back untyped, the feedback
    set nobody wrote to made the dedupe turn every raw row into Python strings (at 500,000
    images build_model_input took 0.8 s, not 0.4 s). Every index reads back with one set of
    column types."""
    store = ShardedImagesDataset(path=str(tmp_path / "decoded_feedback"))
    store.save(decode_images({}, None, PARAMS))
    empty = next_run(store).load()
    assert empty.index.dtypes.astype(str).to_dict() == INDEX_DTYPES

    files = stored_files(sample_dir, [], count=240)
    raw = decode_images({name: files[name] for name in sorted(files)[::20]}, None, PARAMS)
    train, *_ = build_model_input(raw, empty, PARAMS)
    assert {str(train.index[column].dtype) for column in ("content_hash", "file", "shard")} == {
        "str"
    }


def test_an_index_saved_in_a_run_is_not_read_again_until_its_file_changes_or_is_released(
    sample_dir, tmp_path, monkeypatch
):
    """The nodes after a save load each decoded set three times and each split of the model
    input twice in one data_processing run (about 1 s of reads at a million images): a dataset
    hands back the index it wrote while its file is the one it wrote. A file another writer
    replaced is read, and a dataset Kedro released reads its file."""
    reads = []
    read_parquet = pd.read_parquet
    monkeypatch.setattr(
        pd, "read_parquet", lambda *a, **k: reads.append(1) or read_parquet(*a, **k)
    )
    every = stored_files(sample_dir, [], count=240)
    files = {name: every[name] for name in sorted(every)[::24]}  # 10 files of 6 classes
    store = ShardedImagesDataset(path=str(tmp_path / "decoded"))
    saved = decode_images(files, None, PARAMS)
    store.save(saved)

    kept = store.load()
    assert reads == []
    kept.index.loc[0, "label"] = "changed by a node"
    assert store.load().index.loc[0, "label"] == saved.index.loc[0, "label"]

    ShardedImagesDataset(path=str(tmp_path / "decoded")).save(
        decode_images({name: files[name] for name in sorted(files)[:4]}, None, PARAMS)
    )  # another run
    assert len(store.load()["labels"]) == 4 and len(reads) == 1
    store.save(saved)
    assert len(next_run(store).load()["labels"]) == 10 and len(reads) == 2

    empty = decode_images({}, None, PARAMS)
    train, *_ = build_model_input(saved, empty, PARAMS)
    model_input = ModelInputDataset(
        path=str(tmp_path / "train"), shards_from={"raw": str(tmp_path / "decoded")}
    )
    model_input.save(train)
    assert model_input.load()["content_hashes"] == train["content_hashes"] and len(reads) == 2
    model_input.release()
    assert model_input.load()["content_hashes"] == train["content_hashes"] and len(reads) == 3


@pytest.mark.parametrize("run", ["first run", "rerun, nothing new", "rerun, one new file"])
def test_the_index_a_dataset_keeps_from_its_save_is_the_one_its_file_reads_back(
    sample_dir, tmp_path, run
):
    """The run's later nodes get the kept index, the next run reads the file: the same table,
    column types included. The decode node returned ``shard`` as Python objects, which the
    file reads back as strings: a model input built from that output and kept as saved cost
    0.1 s more a load at a million images (its shards' lookup hashed Python strings)."""
    every = stored_files(sample_dir, [], count=240)
    files = {name: every[name] for name in sorted(every)[::24]}
    raw, train = str(tmp_path / "raw"), str(tmp_path / "train")
    store = ShardedImagesDataset(path=raw)
    decoded = decode_images(files, None, PARAMS)
    if run != "first run":
        known = sorted(files)[:-1] if run == "rerun, one new file" else files
        store.save(decode_images({name: files[name] for name in known}, None, PARAMS))
        decoded = decode_images(files, next_run(store).load(), PARAMS)
    store.save(decoded)
    model_input = ModelInputDataset(path=train, shards_from={"raw": raw})
    model_input.save(build_model_input(decoded, decode_images({}, None, PARAMS), PARAMS)[0])

    pd.testing.assert_frame_equal(store.load().index, ShardedImagesDataset(path=raw).load().index)
    pd.testing.assert_frame_equal(
        model_input.load().index,
        ModelInputDataset(path=train, shards_from={"raw": raw}).load().index,
    )


def test_a_rejection_without_a_store_version_reports_none_not_nan():
    """The data report is JSON: a missing version is null there, never NaN."""
    rejected = decode_images({"CXR/bad.jpeg": lambda: b"not an image"}, None, PARAMS)["rejected"]
    assert rejected == [{"file": "CXR/bad.jpeg", "reason": rejected[0]["reason"], "version": None}]


def test_full_rescan_decodes_everything_and_deletes_unreferenced_shards(sample_dir, tmp_path):
    reads: list[str] = []
    files = stored_files(sample_dir, reads, count=8)
    store = ShardedImagesDataset(path=str(tmp_path / "decoded"))
    store.save(decode_images(files, None, PARAMS))
    for name in sorted(files)[:4]:  # the first shard's files are deleted from the store
        del files[name]
    store.save(decode_images(files, next_run(store).load(), PARAMS))
    assert len(shard_files(tmp_path / "decoded")) == 2  # a dead shard stays until a rescan

    reads.clear()
    rescan = decode_images(files, next_run(store).load(), {**PARAMS, "full_rescan": True})
    store.save(rescan)
    assert sorted(reads) == sorted(files) and rescan["reused"] == 0
    assert len(shard_files(tmp_path / "decoded")) == 3  # the replaced index's, until the next
    store.save(decode_images(files, next_run(store).load(), {**PARAMS, "full_rescan": True}))
    assert len(shard_files(tmp_path / "decoded")) == 1
    loaded = next_run(store).load()
    assert np.array_equal(loaded.pixels_of(np.arange(4)), rescan.pixels_of(np.arange(4)))


def test_a_full_rescan_keeps_the_shards_of_the_index_it_replaces_until_the_next_rescan(
    sample_dir, tmp_path
):
    """A reader that loaded the index before a rescan (a streamed training of hours, the
    monitoring reference) reads its shards to the end: deleted at once, it failed midway."""
    files = stored_files(sample_dir, [], count=8)
    store = ShardedImagesDataset(path=str(tmp_path / "decoded"))
    store.save(decode_images(files, None, PARAMS))
    del files[sorted(files)[0]]  # the rescan packs the other 7 into other shards
    store.save(decode_images(files, next_run(store).load(), PARAMS))
    reader = next_run(store).load()
    before = shard_files(tmp_path / "decoded")

    rescan = decode_images(files, next_run(store).load(), {**PARAMS, "full_rescan": True})
    store.save(rescan)

    fresh = set(rescan.index["shard"])
    assert not fresh & set(before) and set(shard_files(tmp_path / "decoded")) == {*before, *fresh}
    every = np.arange(len(files))
    assert np.array_equal(reader.pixels_of(every), rescan.pixels_of(every))
    store.save(decode_images(files, next_run(store).load(), {**PARAMS, "full_rescan": True}))
    assert set(shard_files(tmp_path / "decoded")) == fresh


class _Trap:
    """Unpickling this creates a file: the proof that a reader ran the writer's code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_an_old_single_pickle_is_never_unpickled_but_decoded_again_once(
    sample_dir, tmp_path, caplog
):
    legacy = tmp_path / "decoded_raw_images.pkl"
    marker = tmp_path / "unpickled"
    legacy.write_bytes(pickle.dumps(_Trap(str(marker))))
    store = ShardedImagesDataset(path=str(tmp_path / "decoded"), legacy={"filepath": str(legacy)})
    reads: list[str] = []
    files = stored_files(sample_dir, reads, count=3)

    with caplog.at_level(logging.WARNING):
        previous = store.load()
    assert previous is None and not marker.exists()
    assert "decoding every image once" in caplog.text
    store.save(decode_images(files, previous, PARAMS))

    assert not legacy.exists() and not marker.exists()
    assert len(reads) == 3 and len(next_run(store).load()["labels"]) == 3


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("shard", "not a NumPy array of pixels"),
        ("missing shard", "is missing"),
        ("index", "not a readable Parquet index"),
    ],
)
def test_a_damaged_decoded_set_says_how_to_recover(sample_dir, tmp_path, damage, message):
    store = ShardedImagesDataset(path=str(tmp_path / "decoded"))
    store.save(decode_images(stored_files(sample_dir, [], count=3), None, PARAMS))
    (shard,) = (tmp_path / "decoded/shards").glob("*.npy")
    if damage == "shard":
        shard.write_bytes(pickle.dumps({"pixels": "not an array"}))
    elif damage == "missing shard":
        shard.unlink()
    else:
        (tmp_path / "decoded/index.parquet").write_bytes(b"PAR1 garbage")

    with pytest.raises(DatasetError, match=message) as error:
        store.load().pixels_of(np.arange(3))
    assert "full_rescan=true" in str(error.value)


def test_a_model_input_saved_before_it_named_files_still_loads(sample_dir, tmp_path):
    """Model input written by earlier versions has no ``file`` column: `kedro run --pipeline
    training` after an upgrade must still read it (only the manifest needs the files)."""
    decoded = decode_images(stored_files(sample_dir, []), None, PARAMS)
    ShardedImagesDataset(path=str(tmp_path / "decoded_raw")).save(decoded)
    index = decoded.accepted[["content_hash", "shard", "row"]].assign(label=0, source="raw")
    (tmp_path / "train").mkdir()
    index.to_parquet(tmp_path / "train/index.parquet", index=False)
    shards_from = {"raw": str(tmp_path / "decoded_raw"), "feedback": str(tmp_path / "none")}

    loaded = ModelInputDataset(path=str(tmp_path / "train"), shards_from=shards_from).load()
    assert loaded["content_hashes"] == index["content_hash"].tolist()
    assert np.array_equal(loaded["images"][:, 0], decoded.pixels_of(np.arange(len(index))))


def test_the_rebuilt_model_input_is_stored_without_pickles(tmp_path):
    data = {
        "train": {"images": np.ones((2, 1, 64, 64), np.uint8), "labels": np.array([0, 1])},
        "test": {"images": np.zeros((0, 1, 64, 64), np.uint8), "content_hashes": []},
        "class_names": ["CXR", "Hand"],
    }
    data["train"]["content_hashes"] = ["ab", "cd"]
    store = NpzDataset(filepath=str(tmp_path / "rebuilt/model_input.npz"))
    store.save(data)

    loaded = store.load()
    assert loaded["class_names"] == ["CXR", "Hand"] and loaded["test"]["content_hashes"] == []
    assert loaded["train"]["content_hashes"] == ["ab", "cd"]
    assert np.array_equal(loaded["train"]["images"], data["train"]["images"])
    with np.load(tmp_path / "rebuilt/model_input.npz", allow_pickle=False) as arrays:
        assert all(arrays[key].dtype != object for key in arrays.files)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"full_rescan": "yes"}, "full_rescan must be true or false"),
        ({"shard_images": 0}, "shard_images must be a positive integer"),
        ({"shard_images": "many"}, "shard_images must be a positive integer"),
        ({"classes": "Hand"}, "classes must be a list"),
    ],
)
def test_bad_data_processing_parameters_are_refused(params, message):
    with pytest.raises(ValueError, match=message):
        decode_images({}, None, {**PARAMS, **params})


def test_every_bad_data_processing_parameter_is_named_in_one_error():
    bad = {"full_rescan": "yes", "shard_images": 0, "classes": "Hand", "split": {}}
    with pytest.raises(ValueError) as refused:
        decode_images({}, None, {**PARAMS, **bad})
    for name in ("full_rescan", "shard_images", "classes", "validation_fraction"):
        assert name in str(refused.value)


def test_local_image_folder_versions_change_with_the_file(tmp_path):
    (tmp_path / "Hand").mkdir()
    image = tmp_path / "Hand/a.jpeg"
    image.write_bytes(b"one")
    before = ImageFolderDataset(path=str(tmp_path)).load()["Hand/a.jpeg"]
    image.write_bytes(b"three")
    after = ImageFolderDataset(path=str(tmp_path)).load()["Hand/a.jpeg"]
    assert before.version != after.version and after() == b"three"


CHAMPION = registry.RegisteredClassifier(
    model=None, version="3", class_names=["CXR", "Hand"], tags={"dataset_fingerprint": "abc"}
)
TRAINED_ON = [(f"{n:064x}", "Hand") for n in range(20)] + [
    (f"{n:064x}", "CXR") for n in range(20, 30)
]


def manifest(pairs: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(pairs, columns=["content_hash", "label"]).assign(split="train")


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
    assert "9 new or relabelled and 0 removed images" in decision["reason"]
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


@pytest.mark.e2e
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


@pytest.mark.e2e
@pytest.mark.parametrize("folder_times", [False, True], ids=["every-file", "folder-times"])
def test_a_local_rerun_after_adding_changing_and_deleting_equals_a_full_rescan(
    tmp_path, sample_dir, folder_times
):
    """With ``raw_folder_times`` the rerun lists only the raw store's folders whose time moved;
    its files are then changed as writers replace files (a new file renamed over the old one),
    which moves the folder's time: a rewrite in place is the one change it leaves to the
    monthly full listing (tests/test_changes.py). Without it, files are rewritten in place."""
    project = make_project(tmp_path / "project", sample_dir)
    data = project / "data"
    if folder_times:
        (project / "conf/local/globals.yml").write_text("raw_folder_times: true\n")
        for folder in [data / "01_raw/mednist", *(data / "01_raw/mednist").iterdir()]:
            os.utime(folder, (os.stat(folder).st_atime, os.stat(folder).st_mtime - 60))

    def put(key: str, content: bytes) -> None:
        (data / key).parent.mkdir(parents=True, exist_ok=True)
        (data / f"{key}.part" if folder_times else data / key).write_bytes(content)
        if folder_times:
            os.replace(data / f"{key}.part", data / key)

    seed_feedback(put, sample_dir)
    assert_ok(kedro(project, "run", "--pipeline", "data_processing"))
    first = json.loads((data / "08_reporting/data_report.json").read_text())
    read_again = add_change_and_delete(put, lambda key: (data / key).unlink(), sample_dir)

    result = kedro(project, "run", "--pipeline", "data_processing")
    assert_ok(result)
    # Rich wraps long log lines around the logger's file:line column: taken out.
    log = " ".join(re.sub(r"\s\S+\.py:\d+\s", " ", result.stdout + result.stderr).split())
    assert ("3 of 7 folders changed" in log and "120 files asked again" in log) == folder_times
    rerun = json.loads((data / "08_reporting/data_report.json").read_text())
    rerun_rows = model_input_rows(str(data))
    assert_ok(kedro(project, "run", "--pipeline", "data_processing", "--params", RESCAN))
    rescan = json.loads((data / "08_reporting/data_report.json").read_text())

    files = rerun["raw_images_decoded"] + rerun["feedback_images_decoded"]
    assert rerun["files_reused_from_last_run"] == files - read_again
    assert rescan["files_reused_from_last_run"] == 0
    assert rerun["dataset_fingerprint"] == rescan["dataset_fingerprint"]
    assert rerun["dataset_fingerprint"] != first["dataset_fingerprint"]
    assert rerun_rows == model_input_rows(str(data))


def test_local_versions_are_size_mtime_and_ctime_of_the_file_or_its_links_target(tmp_path):
    """What decides a file is read again (``changes.local_versions``): the target's, for a link."""
    (tmp_path / "Hand/nested").mkdir(parents=True)
    (tmp_path / "Hand/a.jpeg").write_bytes(b"one")
    (tmp_path / "Hand/nested/b.jpeg").write_bytes(b"three")
    (tmp_path / "loose.jpeg").write_bytes(b"four")
    (tmp_path / "Hand/link.jpeg").symlink_to(tmp_path / "Hand/a.jpeg")
    files = ImageFolderDataset(path=str(tmp_path)).load()
    expected = {}
    for name in ("Hand/a.jpeg", "Hand/nested/b.jpeg", "loose.jpeg", "Hand/link.jpeg"):
        stat = os.stat(tmp_path / name)
        expected[name] = f"{stat.st_size}:{stat.st_mtime}:{stat.st_ctime_ns}"
    assert {name: file.version for name, file in files.items()} == expected
    assert files["Hand/link.jpeg"]() == b"one" and files["Hand/nested/b.jpeg"]() == b"three"


def test_versions_of_earlier_runs_read_every_local_file_again_once_and_say_why(
    sample_dir, tmp_path, caplog
):
    """An index of an earlier medical_ct holds ``size:mtime``, which the version now extends:
    the first rerun after the upgrade reads every local file again, and says so."""
    raw = tmp_path / "raw"
    for path in sorted(sample_dir.glob("*/*.jpeg"))[:4]:
        (raw / path.parent.name).mkdir(parents=True, exist_ok=True)
        (raw / path.parent.name / path.name).write_bytes(path.read_bytes())
    store = ShardedImagesDataset(path=str(tmp_path / "decoded"))
    store.save(decode_images(ImageFolderDataset(path=str(raw)).load(), None, PARAMS))
    earlier = next_run(store).load()
    earlier.index["version"] = earlier.index["version"].str.rpartition(":")[0]  # size:mtime
    with caplog.at_level(logging.WARNING, logger="medical_ct.pipelines.data_processing"):
        rerun = decode_images(ImageFolderDataset(path=str(raw)).load(), earlier, PARAMS)
    assert rerun["reused"] == 0
    assert "4 files carry the version an earlier medical_ct gave a local file" in caplog.text
    store.save(rerun)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medical_ct.pipelines.data_processing"):
        again = decode_images(
            ImageFolderDataset(path=str(raw)).load(), next_run(store).load(), PARAMS
        )
    assert again["reused"] == 4 and "earlier medical_ct" not in caplog.text


def test_a_file_deleted_between_listing_and_reading_is_left_out_with_a_warning(
    sample_dir, tmp_path, caplog
):
    """Another process (a retention job, a withdrawn image) deletes a file after Kedro listed
    the store: the run goes on without it, as a full rescan after the deletion would."""
    raw = tmp_path / "raw"
    for path in sorted(sample_dir.glob("*/*.jpeg"))[:4]:
        (raw / path.parent.name).mkdir(parents=True, exist_ok=True)
        (raw / path.parent.name / path.name).write_bytes(path.read_bytes())
    gone = raw / "Hand/gone.jpeg"
    gone.parent.mkdir(exist_ok=True)
    gone.write_bytes(next(sample_dir.glob("Hand/*.jpeg")).read_bytes())
    listing = ImageFolderDataset(path=str(raw)).load()
    gone.unlink()

    with caplog.at_level(logging.WARNING):
        decoded = decode_images(listing, None, PARAMS)
    assert "Hand/gone.jpeg" not in decoded.index["file"].tolist()
    assert "Left out Hand/gone.jpeg: deleted since it was listed" in caplog.text
    rescan = decode_images(ImageFolderDataset(path=str(raw)).load(), None, PARAMS)
    assert decoded.index.drop(columns="row").equals(rescan.index.drop(columns="row"))


def test_a_file_the_run_may_not_read_stops_it_naming_the_file_and_the_fix(sample_dir):
    """Not a rejection: the image may be good, and a rejection would stay after the access is
    fixed (a chmod changes neither size nor time) where a rescan would decode it."""
    files = stored_files(sample_dir, [], count=2)

    def refused() -> bytes:
        raise PermissionError(13, "Permission denied")

    files["Hand/locked.jpeg"] = StoredFile(version="1:v1", read=refused)
    with pytest.raises(PermissionError, match=r"cannot read Hand/locked\.jpeg .*read access"):
        decode_images(files, None, PARAMS)


def model_input_of(raw: ShardedImages) -> list[tuple]:
    """Each split's content hashes, labels and pixels, as training reads them."""
    sets = build_model_input(raw, decode_images({}, None, PARAMS), PARAMS)[:3]
    return [(s["content_hashes"], s["labels"].tolist(), s["images"].tobytes()) for s in sets]


@pytest.mark.parametrize("file_too", [False, True], ids=["shard-lost", "shard-and-a-file-gone"])
def test_a_rerun_decodes_again_the_files_of_a_lost_shard(sample_dir, tmp_path, caplog, file_too):
    """A shard deleted by hand: the rerun reused the rows naming it, reported success and the
    same fingerprint, and only training failed. Now it decodes their files again."""
    files = {
        f"{label}/{path.name}": StoredFile(version="v1", read=path.read_bytes)
        for label in CLASSES
        for path in sorted((sample_dir / label).glob("*.jpeg"))[:2]
    }
    store = ShardedImagesDataset(path=str(tmp_path / "decoded"))
    store.save(decode_images(files, None, PARAMS))
    first = next_run(store).load()
    lost = first.index["shard"].iloc[0]
    (tmp_path / "decoded/shards" / lost).unlink()
    if file_too:
        del files[first.index["file"].iloc[0]]

    with caplog.at_level(logging.WARNING):
        rerun = decode_images(files, next_run(store).load(), PARAMS)
    store.save(rerun)
    saved = next_run(store).load()
    assert set(saved.index["shard"]) <= set(shard_files(tmp_path / "decoded"))
    rescan = decode_images(files, None, PARAMS)
    assert saved["files"] == rescan["files"]
    assert model_input_of(saved) == model_input_of(rescan)
    assert f"missing (deleted or lost): {lost}; decoding their 4 files again" in caplog.text
    assert rerun["reused"] == len(files) - (3 if file_too else 4)
    assert saved.missing_shards() == set()


@pytest.mark.parametrize(
    ("made_by", "read_again"),
    [
        ("this code", False),
        ("another resampling", True),
        ("an index that recorded none", False),
    ],
)
def test_a_rerun_decodes_everything_again_when_another_preprocessing_made_the_pixels(
    sample_dir, tmp_path, caplog, made_by, read_again
):
    """A change of preprocess_image that keeps 64x64 (resampling, grey mapping) reused last
    run's stale pixels and hashes; a change of size failed only in training. An index written
    before indexes recorded the spec was made by this one as far as anyone knows."""
    reads: list[str] = []
    files = stored_files(sample_dir, reads, count=6)
    first = decode_images(files, None, PARAMS)
    first.preprocessing = {
        "this code": PREPROCESSING_SPEC,
        "another resampling": {**PREPROCESSING_SPEC, "resample": "nearest"},
        "an index that recorded none": None,
    }[made_by]
    store = ShardedImagesDataset(path=str(tmp_path / "decoded"))
    store.save(first)

    reads.clear()
    with caplog.at_level(logging.WARNING):
        rerun = decode_images(files, next_run(store).load(), PARAMS)
    store.save(rerun)
    assert sorted(reads) == (sorted(files) if read_again else [])
    assert rerun["reused"] == (0 if read_again else 6)
    assert ("resample 'nearest' -> 'bilinear'" in caplog.text) == read_again
    metadata = pq.read_schema(tmp_path / "decoded/index.parquet").metadata[b"PANDAS_ATTRS"]
    assert json.loads(metadata)["medical_ct.preprocessing"] == PREPROCESSING_SPEC
    assert next_run(store).load().preprocessing == PREPROCESSING_SPEC
