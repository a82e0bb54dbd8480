"""data_processing nodes on real sample images and on bad files."""

import functools
import hashlib
import io

import numpy as np
import pandas as pd
import pytest
from kedro.io import DatasetError
from PIL import Image

from medical_ct.datasets import FolderHasFilesDataset, ImageFolderDataset, collect_records
from medical_ct.manifest import choose_images, fingerprint
from medical_ct.pipelines.data_processing.nodes import (
    build_model_input,
    decode_images,
    decode_reviewed_feedback,
    ingest_mednist,
    report_data,
    report_feedback,
    split_of,
    splits_of,
)
from medical_ct.preprocessing import content_hash, preprocess_image
from medical_ct.shards import ShardedImages
from tests.conftest import CLASSES
from tests.test_preprocessing import corrupt_gif, corrupt_tiff

SPLIT = {"validation_fraction": 0.2, "test_fraction": 0.2}
PARAMS = {"classes": CLASSES, "split": SPLIT}


def partitions_from(files: dict[str, bytes]) -> dict:
    return {name: (lambda data=data: data) for name, data in files.items()}


def sample_files(sample_dir, per_class: int = 40) -> dict[str, bytes]:
    return {
        f"{path.parent.name}/{path.name}": path.read_bytes()
        for class_dir in sorted(sample_dir.iterdir())
        for path in sorted(class_dir.glob("*.jpeg"))[:per_class]
    }


def decode(files: dict[str, bytes]):
    return decode_images(partitions_from(files), None, PARAMS)


def test_decode_rejects_bad_files_counts_them_and_keeps_the_rest(sample_dir):
    files = sample_files(sample_dir, per_class=3)
    jpeg = files["Hand/" + sorted(p.name for p in (sample_dir / "Hand").glob("*.jpeg"))[0]]
    rgba = io.BytesIO()
    Image.new("RGBA", (80, 120), (10, 200, 30, 255)).save(rgba, "PNG")
    bad = {
        "Hand/zero.jpeg": b"",
        "Hand/notes.txt": b"not an image at all",
        "Hand/truncated.jpeg": jpeg[: len(jpeg) // 3],
        "Hand/scan.tif": corrupt_tiff(),
        "Hand/scan.gif": corrupt_gif(),
        "Dental/xray.jpeg": jpeg,
        "loose.jpeg": jpeg,
    }
    decoded = decode({**files, **bad, "CXR/rgba.png": rgba.getvalue()})

    reasons = {item["file"]: item["reason"] for item in decoded["rejected"]}
    assert set(reasons) == set(bad)
    assert "empty" in reasons["Hand/zero.jpeg"]
    assert "not an image" in reasons["Hand/notes.txt"]
    assert "cannot be decoded" in reasons["Hand/truncated.jpeg"]
    assert "TypeError: Missing dimensions" in reasons["Hand/scan.tif"]
    assert "IndexError" in reasons["Hand/scan.gif"]
    assert "unknown class 'Dental'" in reasons["Dental/xray.jpeg"]
    assert "class" in reasons["loose.jpeg"]
    assert len(decoded["labels"]) == len(files) + 1
    assert decoded.pixels_of(np.arange(len(files) + 1)).shape == (len(files) + 1, 64, 64)
    assert "CXR/rgba.png" in decoded["files"]


def test_each_file_decoded_lies_in_its_shard_row_and_shards_follow_content_hashes(sample_dir):
    """The shards are cut from the decoded pixels reordered in place (no second copy): each
    accepted file's pixels must be found where its index row points, with its hash, between
    rejected files (which take no pixels) and across shards of 7, in content-hash order."""
    files = sample_files(sample_dir, per_class=10)
    bad = {"Hand/zero.jpeg": b"", "AbdomenCT/notes.txt": b"text", "Dental/x.jpeg": b""}
    decoded = decode_images(partitions_from({**files, **bad}), None, PARAMS | {"shard_images": 7})

    accepted = decoded.accepted
    assert len(accepted) == len(files) and len(decoded.new_shards) == -(-len(files) // 7)
    for file, digest, shard, row in accepted[["file", "content_hash", "shard", "row"]].values:
        pixels = decoded.new_shards[shard][row]
        assert content_hash(pixels) == digest
        assert np.array_equal(pixels, preprocess_image(files[file]))
    in_shard_order = [
        content_hash(pixels) for pixels in np.concatenate([*decoded.new_shards.values()])
    ]
    assert in_shard_order == sorted(accepted["content_hash"])


def test_decode_of_an_empty_store_is_empty():
    decoded = decode({})
    assert decoded.pixels_of(np.arange(0)).shape == (0, 64, 64) and not decoded.new_shards
    assert decoded["labels"] == [] and decoded["rejected"] == []


def test_null_classes_accept_every_class_folder(sample_dir):
    files = sample_files(sample_dir, per_class=1)
    renamed = {name.replace("Hand/", "Dental/"): data for name, data in files.items()}
    every_class = {**PARAMS, "classes": None}
    assert "Dental" in decode_images(partitions_from(renamed), None, every_class)["labels"]


def test_split_is_deterministic_and_stable_as_data_grows(sample_dir):
    files = sample_files(sample_dir)
    names = sorted(files)
    first_half = decode({name: files[name] for name in names[::2]})
    everything = decode(files)
    empty = decode({})

    def split_of(result):
        train, validation, test, *_ = result
        return {
            digest: split
            for split, data in (("train", train), ("validation", validation), ("test", test))
            for digest in data["content_hashes"]
        }

    small = split_of(build_model_input(first_half, empty, PARAMS))
    large = split_of(build_model_input(everything, empty, PARAMS))
    assert split_of(build_model_input(everything, empty, PARAMS)) == large
    assert all(large[digest] == split for digest, split in small.items())
    counts = {split: list(large.values()).count(split) for split in ("train", "validation", "test")}
    assert counts["train"] > counts["test"] > 10 and counts["validation"] > 10


def test_split_and_fingerprint_keep_their_formulas():
    """Registered versions carry fingerprints and images keep their split from run to run, so
    the vectorised code must give what the per-image definitions give, boundaries included."""
    rng = np.random.default_rng(0)
    hashes = ["0" * 64, "f" * 64, format(int(0.2 * 16**15), "015x") + "0" * 49]
    hashes += ["".join(rng.choice(list("0123456789abcdef"), 64)) for _ in range(500)]

    def defined(digest: str) -> str:
        fraction = int(digest[:15], 16) / 16**15
        return "test" if fraction < 0.2 else "validation" if fraction < 0.4 else "train"

    assert list(splits_of(pd.Series(hashes), 0.2, 0.2)) == [defined(h) for h in hashes]
    assert split_of(hashes[2], 0.2, 0.2) == "validation"  # exactly at the boundary
    table = pd.DataFrame(
        {"content_hash": hashes[:3], "label": ["CXR", "Hand", "CXR"], "split": ["a", "b", "c"]}
    )
    lines = "".join(f"{h}:{label}:{split}\n" for h, label, split in table.to_numpy())
    assert fingerprint(table) == hashlib.sha256(lines.encode()).hexdigest()
    # hashed in chunks of rows: a table longer than one chunk hashes its lines as one text
    rows = 65_536 + 100  # two chunks of 65,536 rows, the second short
    long = table.sample(rows, replace=True, random_state=0).reset_index(drop=True)
    lines = "".join(f"{h}:{label}:{split}\n" for h, label, split in long.to_numpy())
    assert fingerprint(long) == hashlib.sha256(lines.encode()).hexdigest()
    assert fingerprint(table.iloc[:0]) == hashlib.sha256(b"").hexdigest()
    assert fingerprint(long.astype(object)) == fingerprint(long)  # Python or Arrow strings


@pytest.mark.parametrize("bad", ["abc", "g" * 64, "\u00e9" * 64, None])
def test_splits_of_refuses_what_is_not_a_sha256_hex_digest(bad):
    """The split is read from the hashes' bytes: a short, non-hex or missing hash is an error
    naming what a hash must be, not a split made of whatever bytes lie there."""
    with pytest.raises(ValueError, match="sha256 hex digests"):
        splits_of(pd.Series(["0" * 64, bad, "f" * 64], dtype=object), 0.2, 0.2)


def decoded_set(files: list[str], labels: list[str], hashes: list[str]) -> ShardedImages:
    """A decoded set with these index rows (no pixels): for nodes that read only the index."""
    count = len(files)
    index = pd.DataFrame(
        {"file": files, "version": "1", "label": labels, "content_hash": hashes}
        | {"shard": "s.npy", "row": np.arange(count), "reason": "", "reused": False}
    )
    return ShardedImages(index)


@pytest.mark.parametrize("hashes", ["sha256", "sharing their first 16 digits"])
def test_choose_images_keeps_the_first_copy_of_each_image_feedback_first(hashes):
    """Against the definition, row by row, on a store where most images have copies: with
    hashes as they come (sorted by their first 16 digits as integers) and with hashes that
    share those digits (which fall back to sorting the whole strings)."""
    rng = np.random.default_rng(7)
    digests = {
        "sha256": [hashlib.sha256(bytes([i % 256, i // 256])).hexdigest() for i in range(1500)],
        "sharing their first 16 digits": [f"{i:064x}" for i in range(1500)],
    }[hashes]

    def images(count: int) -> ShardedImages:
        return decoded_set(
            [f"{i:05d}.png" for i in range(count)],
            rng.choice(["CXR", "Hand", "HeadCT"], count).tolist(),
            [digests[i] for i in rng.integers(0, count // 2, count)],
        )

    raw, feedback = images(3000), images(200)
    choice = choose_images(raw, feedback)
    chosen, duplicates, with_another_label = (
        choice.table(),
        choice.duplicates,
        choice.with_another_label,
    )

    expected, dropped, other = {}, 0, 0
    for source, store in (("feedback", feedback), ("raw", raw)):
        for row in store.accepted.itertuples():
            if row.content_hash in expected:
                dropped += 1
                other += row.label != expected[row.content_hash]["label"]
            else:
                expected[row.content_hash] = {"label": row.label, "source": source, "row": row.row}
    assert (duplicates, with_another_label) == (dropped, other) and other > 0
    assert chosen["content_hash"].tolist() == sorted(expected)
    assert chosen[["label", "source", "row"]].to_dict("records") == [
        expected[digest] for digest in sorted(expected)
    ]
    assert choice.labels.to_pylist() == chosen["label"].tolist()
    assert choice.prefixes.tolist() == [int(digest[:16], 16) for digest in chosen["content_hash"]]


def test_duplicates_are_dropped_and_feedback_label_wins(sample_dir):
    files = sample_files(sample_dir, per_class=5)
    hand_file = next(name for name in files if name.startswith("Hand/"))
    copy = {**files, "Hand/copy-of-first.jpeg": files[hand_file]}
    feedback = decode({"CXR/" + hand_file.split("/")[1]: files[hand_file]})

    train, validation, test, class_names, stats = build_model_input(decode(copy), feedback, PARAMS)
    assert stats["duplicates"] == 2
    assert stats["duplicates_with_another_label"] == 2
    total = sum(len(data["labels"]) for data in (train, validation, test))
    assert total == len(files)
    digest = feedback["content_hashes"][0]
    for data in (train, validation, test):
        if digest in data["content_hashes"]:
            label = data["labels"][data["content_hashes"].index(digest)]
            assert class_names[label] == "CXR"
            break
    else:
        pytest.fail("the corrected image is missing from the model input")


def test_report_feedback_names_the_accepted_labels_that_change_a_raw_one():
    h = [digit * 64 for digit in "1239"]
    raw = decoded_set(["Hand/a.png", "CXR/b.png", "Hand/c.png"], ["Hand", "CXR", "Hand"], h[:3])
    feedback = decoded_set(
        ["CXR/f1.png", "Hand/f2.png", "CXR/f3.png"], ["CXR", "Hand", "CXR"], [h[0], h[2], h[3]]
    )
    records = {  # id0 relabels raw a, id1 agrees with raw c, id2 has no raw copy, id3 no file
        f"id{n}": {"feedback_id": f"id{n}", "accepted_as": file, "label": label}
        | {"decision": "accept", "reviewer": "ann"}
        for n, (file, label) in enumerate(
            [("CXR/f1.png", "CXR"), ("Hand/f2.png", "Hand"), ("CXR/f3.png", "CXR"), ("x", "CXR")]
        )
    }
    pending = {"id0": dict, "id9": dict}

    report, metrics = report_feedback(pending, records, {}, raw, feedback)

    assert report["accepted_changing_a_raw_label"] == [
        {
            "feedback_id": "id0",
            "raw_label": "Hand",
            "label": "CXR",
            "submitted_label": None,
            "reviewer": "ann",
            "decided_at": None,
        }
    ]
    assert (report["pending"], report["accepted"], report["changed_raw_label"]) == (1, 4, 1)
    assert metrics["feedback.changed_raw_label"] == {"value": 1, "step": 0}


def test_model_input_layout(sample_dir):
    train, validation, test, class_names, _ = build_model_input(
        decode(sample_files(sample_dir)), decode({}), PARAMS
    )
    assert class_names == sorted(CLASSES)
    for data in (train, validation, test):
        assert data["images"].dtype == np.uint8
        assert data["images"].shape[1:] == (1, 64, 64)
        assert data["labels"].dtype == np.int64
        assert len(data["labels"]) == len(data["content_hashes"]) == len(data["images"])


@pytest.mark.parametrize(
    "split",
    [
        {"validation_fraction": 0.5, "test_fraction": 0.6},
        {"validation_fraction": 0, "test_fraction": 0.2},
        {"validation_fraction": 0.2},
        {"validation_fraction": "a lot", "test_fraction": 0.2},
    ],
)
def test_bad_split_parameters_are_refused(sample_dir, split):
    with pytest.raises(ValueError, match=r"split|could not convert"):
        build_model_input(decode(sample_files(sample_dir, 2)), decode({}), {"split": split})


def test_one_class_is_not_enough(sample_dir):
    files = {k: v for k, v in sample_files(sample_dir, 5).items() if k.startswith("Hand/")}
    with pytest.raises(ValueError, match="at least 2 classes"):
        build_model_input(decode(files), decode({}), PARAMS)


def test_report_counts_and_fingerprint(sample_dir):
    files = sample_files(sample_dir, per_class=10)
    raw = decode({**files, "Hand/empty.jpeg": b""})
    model_input = build_model_input(raw, decode({}), PARAMS)
    report, metrics, fingerprint = report_data(*model_input[:4], raw, decode({}), model_input[4])

    assert report["rejected_count"] == 1
    assert sum(report["images_per_split"].values()) == len(files)
    assert sum(sum(c.values()) for c in report["images_per_class_and_split"].values()) == len(files)
    assert metrics["data.rejected_files"]["value"] == 1
    assert fingerprint == report["dataset_fingerprint"]

    again = report_data(
        *build_model_input(raw, decode({}), PARAMS)[:4],
        raw,
        decode({}),
        {"duplicates": 0, "duplicates_with_another_label": 0},
    )[2]
    assert again == fingerprint
    fewer = decode(dict(list(files.items())[1:]))
    changed = build_model_input(fewer, decode({}), PARAMS)
    assert report_data(*changed[:4], fewer, decode({}), changed[4])[2] != fingerprint


def test_ingest_adds_nothing_when_the_raw_store_has_images():
    assert ingest_mednist(True, {"url": "http://127.0.0.1:9/unreachable", "md5": "0"}) == {}


def test_the_raw_store_probe_finds_a_file_below_empty_folders(tmp_path):
    store = tmp_path / "raw"
    probe = FolderHasFilesDataset(path=str(store))
    assert probe.load() is False  # no folder yet
    (store / "AbdomenCT").mkdir(parents=True)
    (store / "Hand/nested").mkdir(parents=True)
    assert probe.load() is False  # folders without a file
    (store / "Hand/b.jpeg.0dead0ff.partial").write_bytes(b"x")  # what a killed ingest left
    assert probe.load() is False
    (store / "Hand/nested/a.jpeg").write_bytes(b"x")
    assert probe.load() is True
    with pytest.raises(DatasetError, match="read-only"):
        probe.save(True)


@pytest.mark.parametrize(
    ("ingest", "message"),
    [
        ({}, "missing url, md5"),
        ({"url": "", "md5": "a" * 32}, "missing url"),
        ({"url": "x"}, "missing md5"),
        ({"url": "x", "md5": 0}, "md5 must be the 32 hex digits"),
        ({"url": "x", "md5": "not-a-checksum"}, "md5 must be the 32 hex digits"),
    ],
)
def test_ingest_parameters_are_checked(ingest, message):
    with pytest.raises(ValueError, match=f"parameters ingest: {message}"):
        ingest_mednist(False, ingest)


def test_only_feedback_images_an_accepted_record_names_are_decoded(sample_dir, tmp_path, caplog):
    """A decision writes the accepted image, then its record: one that failed between the two
    left an image no record accepts (its item still pending, and maybe rejected since). It is
    not trained on; neither is the image of a record nobody can read (named in the log)."""
    files = sample_files(sample_dir, per_class=1)
    accepted, half_decided, unreadable = sorted(files)[:3]
    store = ImageFolderDataset(path=str(tmp_path / "accepted"))
    store.save({name: files[name] for name in (accepted, half_decided, unreadable)})

    def broken() -> dict:
        raise DatasetError("Failed while loading data") from ValueError("Expecting value")

    records = {
        "a-1": lambda: {"accepted_as": accepted, "label": accepted.split("/")[0]},
        "u-1": broken,
        "l-1": lambda: ["not", "a", "record"],
    }
    for listing in (store.load(), partitions_from(files)):  # the catalog's and a plain dict
        caplog.clear()
        decoded, kept = decode_reviewed_feedback(listing, records, {}, None, None, PARAMS)
        assert decoded["files"] == [accepted]
        assert set(kept) == {"a-1"}  # what the manifest and the feedback report get
        logged = " ".join(record.getMessage() for record in caplog.records)
        assert f"Not training on {len(listing) - 1} accepted feedback image(s)" in logged
        assert half_decided in logged and unreadable in logged
        assert "Feedback record u-1 of accepted_feedback_records cannot be read (Expecting" in (
            logged
        )
        assert "Feedback record l-1 of accepted_feedback_records cannot be read (a JSON list" in (
            logged
        )


def test_accepted_records_are_read_once_each_across_runs():
    """Records are never rewritten: a rerun reads only those listed since the last run, keeps
    last run's for the others (a GET each on S3, every week, in every node that needed them),
    drops the deleted, tries an unreadable one again, and a full rescan reads them all."""
    reads: list[str] = []

    def store(*names: str, broken: tuple[str, ...] = ()) -> dict:
        def load(name: str) -> dict:
            reads.append(name)
            if name in broken:
                raise DatasetError("Failed while loading") from ValueError("Expecting value")
            return {"feedback_id": name, "accepted_as": f"Hand/{name}.png"}

        return {name: functools.partial(load, name) for name in names}

    first = collect_records(store("a", "b", "c", broken=("c",)), None)
    assert (sorted(first), sorted(reads)) == (["a", "b"], ["a", "b", "c"])
    reads.clear()
    second = collect_records(store("b", "c", "d"), first)  # a deleted, c mended, d new
    assert (sorted(second), sorted(reads)) == (["b", "c", "d"], ["c", "d"])
    assert second["b"] is first["b"]
    reads.clear()
    rescan = {**PARAMS, "full_rescan": True}
    _, third = decode_reviewed_feedback({}, store("b", "c", "d"), {}, second, None, rescan)
    assert (sorted(third), sorted(reads)) == (["b", "c", "d"], ["b", "c", "d"])
