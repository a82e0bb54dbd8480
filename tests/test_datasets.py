"""The project's datasets write what people sent whole, on the disk before it is answered, and
the stores read back what they can, saying what they cannot."""

import json
import logging
import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kedro.io import DatasetError
from prometheus_client import REGISTRY

from medical_ct.datasets import (
    ImageFolderDataset,
    MlflowRunIdDataset,
    OptionalJSONDataset,
    RecordsDataset,
    read_record,
)
from medical_ct.serving import review
from medical_ct.serving.project import load_project
from medical_ct.serving.review import ReviewError, ReviewStore
from tests.conftest import S3_CREDENTIALS, file_size_limit, make_project, s3_with_bucket


def keep_capturing(caplog) -> None:
    """Put caplog's handler back on the root logger: a first ``load_project``'s logging
    set-up drops it."""
    root = logging.getLogger()
    if caplog.handler not in root.handlers:
        root.addHandler(caplog.handler)


def fsynced_paths(monkeypatch) -> list[str]:
    """The path of every file or folder ``os.fsync``ed from now on, in order (then synced)."""
    synced: list[str] = []
    fsync = os.fsync

    def recording(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording)
    return synced


def test_feedback_and_decisions_reach_the_disk_before_they_are_answered(
    tmp_path, sample_dir, monkeypatch
):
    """A 200 from /feedback or /review promised a clinician's label was kept: a power cut
    right after could leave its name on an empty file when the kernel had not written it yet.
    Each file of the feedback stores is synced under its temporary name, renamed, and its
    folder synced, through the project's own catalog; ingest's raw images are not (tens of
    thousands, and MedNIST can be fetched again)."""
    project = make_project(tmp_path / "project")
    monkeypatch.chdir(project)  # the catalog's data/ paths are relative, as for kedro run
    catalog = load_project(project).catalog
    store = ReviewStore(catalog)
    image = sorted((sample_dir / "Hand").iterdir())[0].read_bytes()
    synced = fsynced_paths(monkeypatch)

    submitted, _ = store.submit(image, "Hand", {"submitter": "t"})
    store.decide(submitted["feedback_id"], "accept", "alice")

    data = project / "data/01_raw"
    written = sorted(path for path in data.rglob("*") if path.is_file())
    assert [str(path.relative_to(data)).split("/")[0] for path in written] == [
        "feedback_accepted",  # images/Hand/<sha256>.jpeg
        "feedback_accepted",  # records/<id>.json
        "feedback_pending",  # images/Hand/<sha256>.jpeg
        "feedback_pending",  # records/<id>.json
        "feedback_pending",  # submissions/<minute>/<submitter>/<time>-<id>.json
        "review_audit",
        "review_decision_claims",  # <id>.json: who decided it, created once
    ]
    assert not any(path.name.endswith(".partial") for path in data.rglob("*"))
    for path in written:
        partial = [i for i, name in enumerate(synced) if name.startswith(f"{path}.")]
        folder = [i for i, name in enumerate(synced) if name == str(path.parent)]
        assert len(partial) == 1 and synced[partial[0]].endswith(".partial"), (path, synced)
        assert folder and max(folder) > partial[0], (path, synced)  # the name after the bytes

    synced.clear()
    catalog.save("raw_images", {"Hand/raw.jpeg": image})
    assert synced == []
    assert (data / "mednist/Hand/raw.jpeg").read_bytes() == image


def test_an_image_cut_short_is_never_listed(tmp_path, sample_dir):
    """A feedback image was written in place: a full disk or a killed worker left half a JPEG
    that data_processing listed (and rejected as undecodable) and the review showed broken. It
    is written under a temporary name the listing leaves out, then renamed."""
    store = ImageFolderDataset(path=str(tmp_path / "images"))
    image = sorted((sample_dir / "Hand").iterdir())[0].read_bytes()
    with file_size_limit(len(image) // 2), pytest.raises(DatasetError, match="File too large"):
        store.save({"Hand/cut.jpeg": image})
    assert [path for path in (tmp_path / "images").rglob("*") if path.is_file()] == []

    killed = tmp_path / "images/Hand/killed.jpeg.0dead0ff.partial"  # a worker killed mid-write
    killed.write_bytes(image[:100])
    store.save({"Hand/whole.jpeg": image})
    listed = store.load()
    assert list(listed) == ["Hand/whole.jpeg"]
    assert listed["Hand/whole.jpeg"]() == image
    assert Path(killed).exists()  # another writer's may still be in flight: not deleted

    in_the_way = tmp_path / "images/Hand/taken.jpeg"  # a folder where the file should go
    in_the_way.mkdir()
    with pytest.raises(DatasetError, match="Is a directory"):
        store.save({"Hand/taken.jpeg": image})
    assert list(in_the_way.iterdir()) == []  # not moved inside it (fsspec's mv would)


def test_a_state_read_back_next_run_is_written_whole_and_a_bad_one_says_what_to_do(tmp_path):
    """Monitoring reads back what its last run saved (where it read through, its trend): a
    run killed mid-write left half a JSON file, and every later run failed on it."""
    state = OptionalJSONDataset(filepath=str(tmp_path / "state.json"))
    assert state.load() is None  # before the first run
    state.save({"read_through": "a", "history": [1, 2]})
    with file_size_limit(8), pytest.raises(DatasetError, match="File too large"):
        state.save({"read_through": "b", "history": [1, 2, 3]})
    assert state.load() == {"read_through": "a", "history": [1, 2]}  # the last whole one
    assert [path.name for path in tmp_path.iterdir()] == ["state.json"]

    (tmp_path / "state.json").write_text('{"read_through": "a", "hist')  # edited by hand
    with pytest.raises(DatasetError, match=r"is not JSON .* delete it to start afresh"):
        state.load()


def test_an_image_is_read_by_its_name_without_a_listing_and_only_inside_its_store(
    tmp_path, sample_dir
):
    """The review reads the images its records name, one at a time: a listing of every image
    ever sent, on every /review, grew with the store. A name cannot climb out of it."""
    store = ImageFolderDataset(path=str(tmp_path / "images"))
    image = sorted((sample_dir / "Hand").iterdir())[0].read_bytes()
    store.save({"Hand/one.jpeg": image})
    (tmp_path / "secret.txt").write_text("a token")
    assert store.read("Hand/one.jpeg") == image
    for name in ("../secret.txt", "Hand/../../secret.txt", str(tmp_path / "secret.txt")):
        with pytest.raises(DatasetError, match="would leave"):
            store.read(name)
    with pytest.raises(FileNotFoundError):
        store.read("Hand/never-sent.jpeg")


def test_an_unreadable_feedback_record_is_left_out_not_every_request_failed(
    tmp_path, sample_dir, monkeypatch, caplog
):
    """One record that is not JSON (a hand edit, a disk error) failed every /feedback and
    /review of every worker: each listing read it. It is left out, named in the log once, and
    counted on /metrics; the rest of the queue works, and a mended file is read again."""
    project = make_project(tmp_path / "project")
    monkeypatch.chdir(project)
    store = ReviewStore(load_project(project).catalog)
    image = sorted((sample_dir / "Hand").iterdir())[0].read_bytes()
    good, _ = store.submit(image, "Hand", {"submitter": "t"})
    records = project / "data/01_raw"

    def pending(name: str, **edited: str | None) -> str:
        """A pending record as the service writes it, with one field ``edited`` by hand."""
        record = {**good, "feedback_id": name, **edited}
        return json.dumps({key: value for key, value in record.items() if value is not None})

    bad = {
        "feedback_pending/records/Hand-notjson.json": '{"feedback_id": "Hand-notjson", "lab',
        "feedback_pending/records/Hand-noimage.json": pending("Hand-noimage", image=None),
        "feedback_pending/records/Hand-nohash.json": pending("Hand-nohash", sha256=None),
        "feedback_pending/records/Hand-badtime.json": pending(
            "Hand-badtime", submitted_at="last Tuesday"
        ),
        "feedback_pending/records/Hand-otherid.json": pending("Hand-otherid", feedback_id="x"),
        "feedback_accepted/records/Hand-list.json": "[1, 2]",
        "feedback_pending/records/Hand-climbs.json": pending(
            "Hand-climbs", image="../../../conf/local/credentials.yml"
        ),
    }
    for path, text in bad.items():
        (records / path).parent.mkdir(parents=True, exist_ok=True)
        (records / path).write_text(text)

    keep_capturing(caplog)
    read = store.records()
    store.records()  # a second look logs nothing new
    assert list(read.pending) == [good["feedback_id"]] and read.accepted == frozenset()
    assert [item["feedback_id"] for item in read.waiting()] == [good["feedback_id"]]
    assert store.waiting() == read.waiting()
    logged = [r.getMessage() for r in caplog.records if r.name == "medical_ct.serving.review"]
    assert len(logged) == 7, logged
    for name, problem in [
        ("Hand-notjson", "Unterminated string"),
        ("Hand-noimage", "no image"),
        ("Hand-nohash", "no sha256"),  # the flags compare images by it
        ("Hand-badtime", "is not an ISO time"),
        ("Hand-otherid", "feedback_id 'x' is not its file's name"),  # looked up by it
        ("Hand-list", "a JSON list, not an object"),
        ("Hand-climbs", "would leave pending_feedback_images"),  # not served by /review/image
    ]:
        assert any(name in line and problem in line for line in logged), (name, logged)
    assert unreadable_gauge("pending_feedback_records") == 6
    assert unreadable_gauge("accepted_feedback_records") == 1

    store.decide(good["feedback_id"], "accept", "alice")  # the queue still works
    (records / "feedback_accepted/records/Hand-list.json").write_text('{"label": "Hand"}')
    assert set(store.records().accepted) == {good["feedback_id"], "Hand-list"}  # mended: read
    assert unreadable_gauge("accepted_feedback_records") == 0


def test_a_decision_asks_the_stores_about_its_one_id_and_lists_none(
    tmp_path, sample_dir, monkeypatch, caplog
):
    """Every decision listed the three record stores, every record ever sent and decided (on S3
    a request per 1,000): a reviewer waited longer each year. It asks the decision stores
    about its one id: one another replica decided is still 409, and so is one whose decision
    record cannot be read (it was written over). A record stored since the worker last looked
    is read at its next look, not by a decision."""
    project = make_project(tmp_path / "project")
    monkeypatch.chdir(project)
    store, replica = (ReviewStore(load_project(project).catalog) for _ in range(2))
    images = sorted((sample_dir / "Hand").iterdir())[:3]
    ids = [store.submit(p.read_bytes(), "Hand", {})[0]["feedback_id"] for p in images]
    store.records()  # the worker's look
    replica.decide(ids[0], "reject", "bob")
    accepted = project / "data/01_raw/feedback_accepted/records"
    accepted.mkdir(parents=True)
    (accepted / f"{ids[1]}.json").write_text("[1, 2")  # a decision record broken by hand
    (accepted / "Hand-stored-since.json").write_text('{"label": "Ha')
    keep_capturing(caplog)

    # A name too long for the disk was an OSError, answered 500; any id not shaped as the
    # service makes them is unknown.
    for unknown in ("Hand-" + "0" * 32, "../feedback_accepted/records/" + ids[1], "H" * 300):
        with pytest.raises(ReviewError, match="no feedback") as none:
            store.decide(unknown, "accept", "alice")
        assert none.value.status == 404
    with pytest.raises(ReviewError, match="already rejected") as rejected:
        store.decide(ids[0], "accept", "alice")
    with pytest.raises(ReviewError, match="already accepted") as broken:
        store.decide(ids[1], "reject", "alice")
    record, waiting = store.decide(ids[2], "accept", "alice")

    assert rejected.value.status == broken.value.status == 409
    assert (accepted / f"{ids[1]}.json").read_text() == "[1, 2"  # not written over
    assert record["decision"] == "accept" and (accepted / f"{ids[2]}.json").is_file()
    assert [item["feedback_id"] for item in waiting] == [ids[0], ids[1]]  # as the worker knew
    assert "Hand-stored-since" not in caplog.text  # no listing read it
    assert [item["feedback_id"] for item in store.records().waiting()] == []  # the next look
    assert store.waiting() == []  # the count kept: the broken decision record decides too
    assert "Hand-stored-since" in caplog.text
    (accepted / f"{ids[1]}.json").unlink()  # deleted by hand: nothing decided it any more
    assert [item["feedback_id"] for item in store.records().waiting()] == [ids[1]]
    assert [item["feedback_id"] for item in store.waiting()] == [ids[1]]


class RacingStore(ReviewStore):
    """A worker's store that waits, once it found the item undecided, until the other worker
    found it undecided too: the interleaving two reviewers meet on two workers."""

    barrier = threading.Barrier(2)

    def decided(self, feedback_id: str) -> str | None:
        found = super().decided(feedback_id)
        self.barrier.wait(timeout=10)
        return found


def test_two_workers_deciding_one_item_at_once_decide_it_once(tmp_path, sample_dir, monkeypatch):
    """Each worker's lock held only within it: an accept on one worker and a reject on
    another both answered 200, both records were stored, and the rejected image trained."""
    project = make_project(tmp_path / "project")
    monkeypatch.chdir(project)
    alices, bobs = (RacingStore(load_project(project).catalog) for _ in range(2))
    image = next((sample_dir / "Hand").iterdir()).read_bytes()
    feedback_id = alices.submit(image, "Hand", {})[0]["feedback_id"]
    outcomes: dict[str, object] = {}

    def decide(store: ReviewStore, decision: str, reviewer: str) -> None:
        try:
            outcomes[reviewer] = store.decide(feedback_id, decision, reviewer)[0]["decision"]
        except ReviewError as refused:
            outcomes[reviewer] = refused

    threads = [
        threading.Thread(target=decide, args=(alices, "accept", "alice")),
        threading.Thread(target=decide, args=(bobs, "reject", "bob")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    refused = [o for o in outcomes.values() if isinstance(o, ReviewError)]
    assert len(refused) == 1 and refused[0].status == 409, outcomes
    assert "is being decided by another request" in str(refused[0])
    decided = [o for o in outcomes.values() if not isinstance(o, ReviewError)]
    data = project / "data/01_raw"
    stored = [
        store
        for store in ("feedback_accepted", "feedback_rejected")
        if (data / store / "records" / f"{feedback_id}.json").exists()
    ]
    assert stored == [{"accept": "feedback_accepted", "reject": "feedback_rejected"}[decided[0]]]
    assert (data / "feedback_accepted/images/Hand").exists() == (decided == ["accept"])


def test_a_decision_a_store_refused_leaves_the_item_to_decide_again(
    tmp_path, sample_dir, monkeypatch
):
    """The claim of a decision whose record was refused is deleted: nothing was decided."""
    project = make_project(tmp_path / "project")
    monkeypatch.chdir(project)
    store = ReviewStore(load_project(project).catalog)
    image = next((sample_dir / "Hand").iterdir()).read_bytes()
    feedback_id = store.submit(image, "Hand", {})[0]["feedback_id"]
    rejected = project / "data/01_raw/feedback_rejected/records"
    rejected.parent.mkdir(parents=True)
    rejected.write_text("a file where the store's folder belongs")

    with pytest.raises(review.StoreError):
        store.decide(feedback_id, "reject", "bob")
    rejected.unlink()
    record, _ = store.decide(feedback_id, "reject", "bob")

    assert record["reviewer"] == "bob" and (rejected / f"{feedback_id}.json").is_file()


def test_a_record_created_on_s3_is_created_by_one_writer_only(s3_endpoint):
    """S3's conditional PUT (If-None-Match), which the decision claims rely on in the s3
    environment: a second create of one id is refused, and the first record stands."""
    s3_with_bucket(s3_endpoint, "claims")
    credentials = {
        "key": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "secret": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": s3_endpoint},
    }
    claims = RecordsDataset(path="s3://claims/decisions", credentials=credentials)

    first = claims.create("Hand-1", {"reviewer": "alice"})
    second = claims.create("Hand-1", {"reviewer": "bob"})

    assert (first, second) == (True, False)
    assert claims.load()["Hand-1"]() == {"reviewer": "alice"}
    claims.delete("Hand-1")
    assert claims.create("Hand-1", {"reviewer": "bob"}) is True


def test_a_submission_counts_its_senders_last_minute_on_every_replica_and_lists_nothing_else(
    tmp_path, sample_dir, monkeypatch, caplog
):
    """The burst limit listed every pending record ever sent, on every /feedback (on S3 a
    request per 1,000). A new item's name goes into the submissions store under its minute and
    sender, and a submission lists that sender's last two minutes there: every replica's
    items count, a repeat does not, a name edited by hand is left out."""
    project = make_project(tmp_path / "project")
    monkeypatch.chdir(project)
    store, replica = (ReviewStore(load_project(project).catalog) for _ in range(2))
    images = [path.read_bytes() for path in sorted((sample_dir / "CXR").iterdir())[:3]]
    store.submit(images[0], "CXR", {"submitter": "10.0.0.1"})
    store.records()  # the worker's look
    pending = project / "data/01_raw/feedback_pending"
    (pending / "records/Hand-stored-since.json").write_text('{"label": "Ha')
    keep_capturing(caplog)

    replica.submit(images[1], "CXR", {"submitter": "10.0.0.1"})
    replica.submit(images[2], "CXR", {"submitter": "10.0.0.2"})
    repeat, new = store.submit(images[1], "CXR", {"submitter": "10.0.0.1"})
    for folder in (pending / "submissions").glob("*/*"):
        (folder / "edited-by-hand.json").write_text("{}")

    assert not new and repeat["submitter"] == "10.0.0.1"
    sent = store.recent_from("10.0.0.1", timedelta(minutes=1))
    assert len(sent) == 2 and all(datetime.now(UTC) - time < timedelta(minutes=1) for time in sent)
    assert len(store.recent_from("10.0.0.2", timedelta(minutes=1))) == 1
    assert "Hand-stored-since" not in caplog.text  # no listing of the pending records


def test_a_look_between_listings_reads_what_the_journals_name_and_lists_no_record_store(
    tmp_path, sample_dir, monkeypatch, caplog
):
    """Each look (every GET /review, each worker's every look_every_s) listed the three record
    stores: every record ever sent and decided, 30 LIST requests at 10,000 items each pending
    and accepted on S3. A look between listings reads the journals' last minutes instead:
    another replica's new items and decisions (an accept, a reject) are seen, one named by a
    clock 90 s behind too; a record no journal names (written by hand) is read by the next
    listing only."""
    project = make_project(tmp_path / "project")
    monkeypatch.chdir(project)
    store, replica = (ReviewStore(load_project(project).catalog) for _ in range(2))
    images = [path.read_bytes() for path in sorted((sample_dir / "Hand").iterdir())[:4]]
    ids = [store.submit(image, "Hand", {})[0]["feedback_id"] for image in images[:2]]
    store.look()  # lists: the first
    assert [item["feedback_id"] for item in store.known().waiting()] == ids
    pending = project / "data/01_raw/feedback_pending/records"
    (pending / "Hand-stored-since.json").write_text('{"label": "Ha')  # only a listing reads it
    keep_capturing(caplog)

    new = replica.submit(images[2], "Hand", {})[0]["feedback_id"]
    replica.decide(ids[0], "accept", "bob")
    replica.decide(new, "reject", "bob")
    behind = datetime.now(UTC) - timedelta(seconds=90)
    with monkeypatch.context() as clock:  # the replica's clock, or a slow write
        clock.setattr(review, "now", lambda: behind)
        late = replica.submit(images[3], "Hand", {})[0]["feedback_id"]
    store.look()
    looked = store.known()

    assert [item["feedback_id"] for item in looked.waiting()] == [late, ids[1]]
    assert store.waiting() == looked.waiting()  # kept, not counted anew from every record
    assert set(looked.accepted) == {ids[0]} and set(looked.rejected) == {new}
    assert "Hand-stored-since" not in caplog.text  # no record store was listed
    store.look(listing=True)
    assert "Hand-stored-since" in caplog.text


def test_a_journal_entry_refused_after_its_record_leaves_the_record_standing_logged_whole(
    tmp_path, sample_dir, monkeypatch, caplog
):
    """The audit entry was written after the decision record, in the same try: a store that
    refused it answered 503 "nothing was decided" though the decision stood and trained, and
    the reviewer's retry found it done (409). Now the decision is answered; its entry is
    logged whole, to be written back, and counted (alert MedicalCTReviewAuditEntryRefused).
    So is a new item's submissions entry: the item is stored and waits."""
    project = make_project(tmp_path / "project")
    monkeypatch.chdir(project)
    store = ReviewStore(load_project(project).catalog)
    raw = project / "data/01_raw"
    for journal in ("review_audit", "feedback_pending/submissions"):
        (raw / journal).mkdir(parents=True)
        for minutes in range(-1, 3):  # a file where each minute's folder goes: writes fail
            at = datetime.now(UTC) + timedelta(minutes=minutes)
            (raw / journal / f"{at:%Y%m%dT%H%M}").write_text("")
    refused = {journal: journal_refused(journal) for journal in JOURNALS}
    image = sorted((sample_dir / "Hand").iterdir())[0].read_bytes()
    keep_capturing(caplog)

    stored, new = store.submit(image, "Hand", {"submitter": "t"})
    record, waiting = store.decide(stored["feedback_id"], "accept", "alice")

    feedback_id = stored["feedback_id"]
    assert new and (raw / f"feedback_pending/records/{feedback_id}.json").is_file()
    assert (raw / f"feedback_accepted/records/{feedback_id}.json").is_file() and waiting == []
    with pytest.raises(ReviewError, match="already accepted"):
        store.decide(feedback_id, "reject", "bob")
    submitted, decided = [line for line in caplog.messages if "Write it back as" in line]
    assert f"Feedback {feedback_id} is stored, but feedback_submissions refused" in submitted
    assert f"decision on feedback {feedback_id} (accept) stands, but review_audit" in decided
    entry = json.loads(decided.split(".json there: ", 1)[1])
    assert entry["reviewer"] == "alice" and entry["decided_at"] == record["decided_at"]
    assert {journal: journal_refused(journal) - refused[journal] for journal in JOURNALS} == {
        "review_audit": 1,
        "feedback_submissions": 1,
    }


JOURNALS = ("review_audit", "feedback_submissions")


def journal_refused(journal: str) -> float:
    sample = {"journal": journal}
    return REGISTRY.get_sample_value("medical_ct_review_journal_refused_total", sample) or 0


def unreadable_gauge(store: str) -> float | None:
    return REGISTRY.get_sample_value("medical_ct_feedback_unreadable_records", {"store": store})


def test_a_record_store_lists_names_reads_on_call_and_writes_whole(tmp_path):
    """The review's stores: the service lists them on every /feedback and /review, so a
    listing makes no object per record and reads nothing until a record is asked for."""
    store = RecordsDataset(path=str(tmp_path / "records"))
    assert store.load() == {}  # nobody wrote yet
    store.save({"Hand-1": {"label": "Hand"}, "2026/Hand-2": {"label": "CXR"}})
    (tmp_path / "records/Hand-3.json.0dead0ff.partial").write_text('{"lab')  # being written
    (tmp_path / "records/Hand-4.json").write_text('{"label": "Ha')  # edited by hand
    (tmp_path / "backup.json").write_text('{"label": "HeadCT"}')
    (tmp_path / "records/Hand-5.json").symlink_to(tmp_path / "backup.json")  # restored so
    (tmp_path / "records/Hand-6.json").symlink_to(tmp_path / "gone.json")  # points nowhere
    listed = store.load()
    assert sorted(listed) == ["2026/Hand-2", "Hand-1", "Hand-4", "Hand-5"]
    assert "Hand-5" in listed and "Hand-6" not in listed
    assert listed["Hand-5"]() == {"label": "HeadCT"}
    assert listed["2026/Hand-2"]() == {"label": "CXR"}
    assert read_record(listed["Hand-4"]) == (
        None,
        "Unterminated string starting at: line 1 column 11 (char 10)",
    )
    with pytest.raises(DatasetError, match="would leave"):
        store.save({"../elsewhere": {"label": "Hand"}})
    assert not (tmp_path / "elsewhere.json").exists()
    # A decision asks about its one id: found by name as the listing finds it.
    assert store.has("Hand-1") and store.has("2026/Hand-2") and store.has("Hand-4")
    assert not store.has("Hand-3") and not store.has("Hand-6")
    with pytest.raises(DatasetError, match="would leave"):
        store.has("../backup")


def test_the_run_id_dataset_names_the_active_mlflow_run_and_cannot_be_written(
    tmp_path, monkeypatch
):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    dataset = MlflowRunIdDataset()
    assert dataset.load() is None  # outside a run: a plain `kedro run` without kedro-mlflow
    with mlflow.start_run() as run:
        assert dataset.load() == run.info.run_id
    with pytest.raises(DatasetError, match="read-only"):
        dataset.save("a run id")
