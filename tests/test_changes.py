"""Listing what is new: S3 event messages as SQS delivers them (directly or through SNS; the
queue itself is exercised against moto's server in tests/e2e/test_s3.py), and a local disk's
folder times."""

import json
import logging
import os
import time

import pyarrow.parquet as pq
import pytest
from kedro.io import DatasetError

from medical_ct.changes import _LISTED_AT as LISTED_AT
from medical_ct.changes import _SAVED_AT as SAVED_AT
from medical_ct.changes import NotAnS3Event, event_keys
from medical_ct.datasets import ImageFolderDataset


def s3_event(*keys: str, source: str = "aws:s3") -> dict:
    return {
        "Records": [
            {
                "eventSource": source,
                "eventName": "ObjectCreated:Put",
                "s3": {"bucket": {"name": "bucket"}, "object": {"key": key, "size": 3}},
            }
            for key in keys
        ]
    }


def test_keys_are_decoded_as_s3_encodes_them():
    body = json.dumps(s3_event("raw/CXR/a+b%2Bc.jpeg", "raw/Hand/%C3%A9.jpeg"))
    assert event_keys(body) == ["bucket/raw/CXR/a b+c.jpeg", "bucket/raw/Hand/é.jpeg"]


def test_events_through_sns_and_the_test_event_are_understood():
    wrapped = json.dumps({"Type": "Notification", "Message": json.dumps(s3_event("raw/x"))})
    assert event_keys(wrapped) == ["bucket/raw/x"]
    assert event_keys(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"})) == []
    assert event_keys(json.dumps(s3_event("raw/y", source="aws:other"))) == []


@pytest.mark.parametrize(
    "body",
    ["written by hand", "[1, 2]", json.dumps({"Records": [{"s3": {}}]}), json.dumps({"a": 1})],
)
def test_anything_else_is_refused_with_the_message_shown(body):
    with pytest.raises(NotAnS3Event) as refused:
        event_keys(body)
    assert body[:20] in str(refused.value)


def write(path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def age_folders(root, seconds: float = 60) -> None:
    """Move every folder's time back: as after a week, not within the 2 s it is not trusted."""
    for folder in [root, *(path for path in root.rglob("*") if path.is_dir())]:
        then = os.stat(folder).st_mtime - seconds
        os.utime(folder, (then, then))


def folder_times_store(tmp_path, **settings) -> ImageFolderDataset:
    changes = {"folder_times": True, "filepath": str(tmp_path / "listing.parquet")} | settings
    return ImageFolderDataset(path=str(tmp_path / "raw"), changes=changes)


def listed(tmp_path, **settings) -> dict[str, str]:
    return folder_times_store(tmp_path, **settings).load().versions


def every_file(raw) -> dict[str, str]:
    """The listing without folder times: every file asked its size and time."""
    return ImageFolderDataset(path=str(raw)).load().versions


def test_folder_times_list_only_the_folders_whose_time_moved(tmp_path, caplog):
    raw = tmp_path / "raw"
    for name in ("Hand/week-1/a.jpeg", "Hand/week-1/b.jpeg", "CXR/c.jpeg", "CXR/d.jpeg"):
        write(raw / name, name.encode())
    age_folders(raw)
    caplog.set_level(logging.INFO, logger="medical_ct.changes")
    assert listed(tmp_path) == every_file(raw)
    assert "listing every file (no saved listing yet)" in caplog.text

    write(raw / "Hand/week-2/e.jpeg", b"new week")  # a new folder: Hand's time moves
    (raw / "CXR/c.jpeg").unlink()
    write(raw / "CXR/d.part", b"replaced")
    os.replace(raw / "CXR/d.part", raw / "CXR/d.jpeg")
    caplog.clear()
    assert listed(tmp_path) == every_file(raw)
    # Hand, Hand/week-2 and CXR listed (2 files asked); the root and Hand/week-1 not.
    assert "3 of 5 folders changed since the last listing: 2 files asked again, 4 files" in (
        caplog.text
    )


def test_a_file_rewritten_in_place_waits_for_the_full_listing(tmp_path, caplog):
    """The one change folder times cannot see: the folder's names are the same."""
    raw = tmp_path / "raw"
    write(raw / "Hand/a.jpeg", b"one")
    age_folders(raw)
    before = listed(tmp_path)
    time.sleep(0.01)
    (raw / "Hand/a.jpeg").write_bytes(b"other bytes")
    assert listed(tmp_path) == before != every_file(raw)
    caplog.set_level(logging.INFO, logger="medical_ct.changes")
    assert listed(tmp_path, full_listing=True) == every_file(raw)
    assert "(full_listing is set)" in caplog.text
    (raw / "Hand/a.jpeg").write_bytes(b"third")
    assert listed(tmp_path, full_listing_days=0) == every_file(raw)
    assert "over 0 days old" in caplog.text


def test_a_folder_changed_just_before_its_listing_is_listed_again(tmp_path):
    """Its time may not move for a change made in the same tick of the file system's clock."""
    raw = tmp_path / "raw"
    write(raw / "Hand/a.jpeg", b"one")
    listed(tmp_path)  # Hand changed under 2 s ago: not trusted next time
    (raw / "Hand/a.jpeg").write_bytes(b"rewritten in place")
    assert listed(tmp_path) == every_file(raw)


def test_an_unreadable_saved_listing_lists_everything_again(tmp_path, caplog):
    write(tmp_path / "raw/Hand/a.jpeg", b"one")
    (tmp_path / "listing.parquet").write_bytes(b"not Parquet")
    caplog.set_level(logging.INFO, logger="medical_ct.changes")
    assert listed(tmp_path) == every_file(tmp_path / "raw")
    assert "is not a readable listing" in caplog.text and "listing every file" in caplog.text


@pytest.mark.parametrize(
    ("path", "changes", "message"),
    [
        (
            "s3://bucket/raw",
            {"folder_times": True, "filepath": "x"},
            "folder_times: true` with a local",
        ),
        ("data/raw", {"folder_times": True}, "changes.filepath"),
        ("data/raw", {"folder_times": "yes", "filepath": "x"}, "must be true or false, got 'yes'"),
        (
            "data/raw",
            {"folder_times": True, "filepath": "x", "max_events": 5},
            "not one of FolderTimes's",
        ),
    ],
)
def test_bad_changes_settings_say_what_is_wrong(path, changes, message):
    with pytest.raises(DatasetError, match=message):
        ImageFolderDataset(path=path, changes=changes)


def replace_keeping_size_and_time(path, content: bytes) -> None:
    """What ``cp -p``, ``rsync -a``, ``tar -x`` and ``unzip`` do: other bytes, the old mtime."""
    before = os.stat(path)
    assert len(content) == before.st_size
    time.sleep(0.05)  # past the file system clock's tick: a new inode change time
    write(path.with_suffix(".tmp"), content)
    os.utime(path.with_suffix(".tmp"), ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(path.with_suffix(".tmp"), path)


def test_a_file_replaced_with_the_same_size_and_time_is_read_again(tmp_path):
    raw = tmp_path / "raw"
    write(raw / "Hand/a.jpeg", b"one")
    before = every_file(raw)
    replace_keeping_size_and_time(raw / "Hand/a.jpeg", b"two")
    assert every_file(raw)["Hand/a.jpeg"] != before["Hand/a.jpeg"]


def test_a_linked_file_changes_version_when_its_target_is_replaced(tmp_path):
    raw = tmp_path / "raw"
    write(tmp_path / "lake/scan.jpeg", b"one")
    (raw / "Hand").mkdir(parents=True)
    (raw / "Hand/scan.jpeg").symlink_to(tmp_path / "lake/scan.jpeg")
    before = every_file(raw)
    time.sleep(0.05)
    write(tmp_path / "lake/scan.tmp", b"two")  # the same size, a new file renamed over it
    os.replace(tmp_path / "lake/scan.tmp", tmp_path / "lake/scan.jpeg")
    assert every_file(raw)["Hand/scan.jpeg"] != before["Hand/scan.jpeg"]
    assert ImageFolderDataset(path=str(raw)).load()["Hand/scan.jpeg"]() == b"two"


@pytest.mark.parametrize("folder_times", [False, True])
def test_a_name_that_is_not_utf8_is_skipped_naming_it_and_the_rest_is_listed(
    tmp_path, caplog, folder_times
):
    """Linux names are bytes: a Latin-1 ``café.jpeg`` from an SMB share stopped every run."""
    raw = tmp_path / "raw"
    write(raw / "Hand/a.jpeg", b"one")
    latin1 = os.fsencode(raw / "Hand") + b"/caf\xe9.jpeg"
    with open(latin1, "wb") as file:
        file.write(b"two")
    folder = os.fsencode(raw) + b"/Ch\xe9st"  # a folder too: what lies below it is skipped
    os.mkdir(folder)
    with open(folder + b"/b.jpeg", "wb") as file:
        file.write(b"three")
    caplog.set_level(logging.WARNING, logger="medical_ct.changes")
    files = listed(tmp_path) if folder_times else every_file(raw)
    assert list(files) == ["Hand/a.jpeg"]
    assert f"Skipping {latin1!r}: its name is not UTF-8" in caplog.text
    assert f"Skipping {folder!r}: its name is not UTF-8" in caplog.text
    assert "give it a UTF-8 name" in caplog.text


def test_a_linked_folder_is_skipped_with_a_warning_that_names_it(tmp_path, caplog):
    """A class folder linked from a share: not followed, but never left out without a word."""
    raw = tmp_path / "raw"
    write(raw / "CXR/a.jpeg", b"one")
    write(tmp_path / "share/Hand/b.jpeg", b"two")
    (raw / "Hand").symlink_to(tmp_path / "share/Hand", target_is_directory=True)
    caplog.set_level(logging.WARNING, logger="medical_ct.changes")
    assert list(every_file(raw)) == ["CXR/a.jpeg"]
    assert f"Skipping {raw}/Hand: a link to a folder" in caplog.text
    assert "mount --bind" in caplog.text


def saved_in_the_future(listing, seconds: float) -> None:
    """The listing as a run whose clock was ``seconds`` ahead saved it."""
    table = pq.read_table(listing)
    then = str(time.time() + seconds).encode()
    metadata = {**table.schema.metadata, LISTED_AT: then, SAVED_AT: then}
    pq.write_table(table.replace_schema_metadata(metadata), listing)


def test_a_listing_saved_by_a_clock_ahead_lists_everything_again(tmp_path, caplog):
    """Its age cannot be told: the monthly full listing (and on S3 the queue's retention
    check) would wait for real time to reach it."""
    raw = tmp_path / "raw"
    write(raw / "Hand/a.jpeg", b"one")
    age_folders(raw)
    listed(tmp_path)
    saved_in_the_future(tmp_path / "listing.parquet", 365 * 86400)
    (raw / "Hand/a.jpeg").write_bytes(b"rewritten in place")  # only a full listing sees it
    caplog.set_level(logging.INFO, logger="medical_ct.changes")
    assert listed(tmp_path) == every_file(raw)
    assert "listing every file (the saved listing's times are 8760 h ahead" in caplog.text
    caplog.clear()
    saved_in_the_future(tmp_path / "listing.parquet", 600)  # within the clocks' skew
    assert listed(tmp_path) == every_file(raw) and "listing every file" not in caplog.text
