"""The `s3` environment against real servers on loopback: moto's S3 server and `mlflow server`.

No boto or s3fs mocks: the kedro subprocesses talk HTTP to a moto server (as s3fs's own test
suite does), and track runs in an `mlflow server` whose artifacts live in the same bucket.
"""

import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import fsspec
import pyarrow.parquet as pq
import pytest
import s3fs
from botocore.awsrequest import AWSResponse
from kedro.io import DatasetError

from medical_ct import registry
from medical_ct.changes import create_event_queue
from medical_ct.datasets import (
    FolderHasFilesDataset,
    ImageFolderDataset,
    RecordsDataset,
    fetched,
    read_record,
)
from medical_ct.pipelines.data_processing.nodes import decode_images
from medical_ct.shards import ShardedImagesDataset
from tests.conftest import (
    FAST_RUN_PARAMS,
    KEDRO,
    PROJECT_ROOT,
    S3_CREDENTIALS,
    add_change_and_delete,
    assert_ok,
    bucket_env,
    free_port,
    make_project,
    model_input_rows,
    project_env,
    s3_with_bucket,
    seed_feedback,
    upload_images,
)

BUCKET = "medical-ct-test"
PREFIX = "team/weekly"
ROOT = f"{BUCKET}/{PREFIX}"
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


@pytest.fixture(scope="module")
def s3(s3_endpoint) -> s3fs.S3FileSystem:
    return s3_with_bucket(s3_endpoint, BUCKET)


def s3_env(endpoint: str, **extra: str) -> dict[str, str]:
    return bucket_env(endpoint, BUCKET, PREFIX, **extra)


def kedro_s3(project: Path, endpoint: str, *args: str, **extra: str) -> subprocess.CompletedProcess:
    env = project_env(project, **s3_env(endpoint, **extra))
    for inherited in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        env.pop(inherited, None)
    return subprocess.run(
        [KEDRO, "run", "--env", "s3", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, s3_endpoint, s3) -> Iterator[str]:
    """A real `mlflow server`: sqlite backend, artifacts proxied into the moto bucket."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, **s3_env(s3_endpoint)}
    env.pop("MLFLOW_TRACKING_URI", None)
    process = subprocess.Popen(
        [
            MLFLOW,
            "server",
            "--backend-store-uri",
            f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination",
            f"s3://{BUCKET}/mlartifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=(folder / "server.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(folder / 'server.log').read_text()}")
            time.sleep(0.5)
        yield uri
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def registry_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def s3_run(tmp_path_factory, s3, s3_endpoint, mlflow_server, sample_dir):
    """One whole default `kedro run --env s3` on the sample (plus bad objects) in the bucket."""
    uploaded = upload_images(s3, sorted(sample_dir.glob("*/*.jpeg")), ROOT)
    s3.pipe(
        {
            f"{ROOT}/01_raw/mednist/Hand/corrupt.jpeg": b"\xff\xd8\xff\xe0 not really a jpeg",
            f"{ROOT}/01_raw/mednist/Hand/empty.jpeg": b"",
            f"{ROOT}/01_raw/mednist/Dental/000000.jpeg": (
                sample_dir / "Hand/000000.jpeg"
            ).read_bytes(),
        }
    )
    project = make_project(tmp_path_factory.mktemp("s3") / "project")
    result = kedro_s3(
        project, s3_endpoint, "--params", FAST_RUN_PARAMS, MLFLOW_TRACKING_URI=mlflow_server
    )
    assert_ok(result)
    return project, result, uploaded


def read_json(s3: s3fs.S3FileSystem, key: str) -> dict:
    return json.loads(s3.cat_file(f"{ROOT}/{key}"))


def test_the_whole_pipeline_runs_on_the_bucket(s3_run, s3):
    project, _, uploaded = s3_run
    for key in (
        "02_intermediate/decoded_raw/index.parquet",
        "05_model_input/train/index.parquet",
        "05_model_input/test/index.parquet",
        "05_model_input/dataset_fingerprint.txt",
        "06_models/trained_model.pkl",
        "08_reporting/data_report.json",
        "08_reporting/evaluation.json",
        "08_reporting/promotion.json",
        "08_reporting/confusion_matrix.png",
    ):
        assert s3.exists(f"{ROOT}/{key}"), key
    for key in (  # what every rerun writes again: zstd, half the bytes of snappy
        "02_intermediate/decoded_raw/index.parquet",
        "05_model_input/train/index.parquet",
        "05_model_input/training_manifest.parquet",
    ):
        with s3.open(f"{ROOT}/{key}") as file:
            assert pq.ParquetFile(file).metadata.row_group(0).column(0).compression == "ZSTD"
    report = read_json(s3, "08_reporting/data_report.json")
    assert sum(report["images_per_split"].values()) + report["duplicates"] == uploaded
    assert read_json(s3, "08_reporting/promotion.json")["alias"] == registry.CHAMPION_ALIAS
    assert not any(path.is_file() for path in (project / "data").rglob("*")), "wrote locally"


def test_bad_objects_are_skipped_and_counted(s3_run, s3):
    report = read_json(s3, "08_reporting/data_report.json")
    reasons = {rejection["file"]: rejection["reason"] for rejection in report["rejected"]}
    assert reasons["Hand/empty.jpeg"] == "the file is empty"
    assert "Pillow" in reasons["Hand/corrupt.jpeg"] or "decoded" in reasons["Hand/corrupt.jpeg"]
    assert reasons["Dental/000000.jpeg"] == "unknown class 'Dental'"
    assert report["rejected_count"] == 3


def test_run_artifacts_and_champion_are_visible_through_the_mlflow_server(
    s3_run, s3, mlflow_server
):
    client = registry_client(mlflow_server)
    champion = client.get_model_version_by_alias(registry.MODEL_NAME, registry.CHAMPION_ALIAS)
    fingerprint = s3.cat_file(f"{ROOT}/05_model_input/dataset_fingerprint.txt").decode()
    assert champion.tags["dataset_fingerprint"] == fingerprint
    run = client.get_run(champion.run_id)
    assert run.data.metrics["test_accuracy"] >= 0.7
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id, "reports")}
    assert {"reports/data_report.json", "reports/promotion.json"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "reports/data_report.json"))
    assert json.loads(local.read_text())["dataset_fingerprint"] == fingerprint
    # The server proxies artifacts into the bucket: the model's files are there.
    assert s3.find(f"{BUCKET}/mlartifacts", maxdepth=None), "no artifacts in the bucket"
    assert any(path.endswith("MLmodel") for path in s3.find(f"{BUCKET}/mlartifacts"))


def test_a_rerun_on_the_same_data_skips_training_and_registers_nothing(
    s3_run, s3, s3_endpoint, mlflow_server
):
    project, _, _ = s3_run
    client = registry_client(mlflow_server)
    versions = len(client.search_model_versions(f"name='{registry.MODEL_NAME}'"))
    result = kedro_s3(
        project, s3_endpoint, "--params", FAST_RUN_PARAMS, MLFLOW_TRACKING_URI=mlflow_server
    )
    assert_ok(result)
    output = result.stdout + result.stderr
    assert "skipping training and evaluation, registering nothing" in " ".join(output.split())
    assert len(client.search_model_versions(f"name='{registry.MODEL_NAME}'")) == versions
    promotion = read_json(s3, "08_reporting/promotion.json")
    assert promotion["skipped"] is True and promotion["version"] is None
    report = read_json(s3, "08_reporting/data_report.json")
    assert report["files_reused_from_last_run"] == report["raw_images_decoded"] + 2


def test_new_images_are_the_only_ones_decoded_again(s3_run, s3, s3_endpoint, mlflow_server):
    project, _, _ = s3_run
    before = read_json(s3, "08_reporting/data_report.json")
    source = s3.cat_file(f"{ROOT}/01_raw/mednist/CXR/000000.jpeg")
    s3.pipe(
        {
            f"{ROOT}/01_raw/mednist/CXR/new-1.jpeg": source,  # a copy: a duplicate after decoding
            f"{ROOT}/01_raw/mednist/Hand/empty.jpeg": b"",  # rewritten, same content
        }
    )
    result = kedro_s3(
        project,
        s3_endpoint,
        "--pipeline",
        "data_processing",
        MLFLOW_TRACKING_URI=mlflow_server,
    )
    assert_ok(result)
    report = read_json(s3, "08_reporting/data_report.json")
    # Only the new file is read; the rewritten empty one has the same size and ETag.
    assert report["files_reused_from_last_run"] == before["files_reused_from_last_run"]
    assert report["raw_images_decoded"] == before["raw_images_decoded"] + 1
    assert report["duplicates"] == before["duplicates"] + 1


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"MEDICAL_CT_S3_BUCKET": "no-such-bucket"}, "does not exist"),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:{closed_port}"}, "is not reachable"),
    ],
)
def test_an_unusable_store_fails_the_run_early_and_keeps_the_champion(
    s3_run, s3_endpoint, mlflow_server, extra, expected
):
    project, _, _ = s3_run
    extra = {key: value.format(closed_port=free_port()) for key, value in extra.items()}
    started = time.monotonic()
    output = failed_run_keeping_the_champion(project, s3_endpoint, mlflow_server, **extra)
    endpoint = extra.get("AWS_ENDPOINT_URL", s3_endpoint)
    bucket = extra.get("MEDICAL_CT_S3_BUCKET", BUCKET)
    assert f"S3 bucket '{bucket}' at {endpoint} {expected}" in output
    assert "Running node" not in output and "train_model" not in output
    assert time.monotonic() - started < 120


def failed_run_keeping_the_champion(
    project: Path, endpoint: str, mlflow_server: str, **extra: str
) -> str:
    """A forced retraining against ``endpoint`` that must fail and leave the registry as it was;
    its output, whitespace collapsed."""
    client = registry_client(mlflow_server)
    champion = client.get_model_version_by_alias(registry.MODEL_NAME, registry.CHAMPION_ALIAS)
    versions = len(client.search_model_versions(f"name='{registry.MODEL_NAME}'"))
    result = kedro_s3(
        project,
        endpoint,
        "--params",
        FAST_RUN_PARAMS + ",retrain_on_same_data=true",
        MLFLOW_TRACKING_URI=mlflow_server,
        **extra,
    )
    assert result.returncode != 0
    after = client.get_model_version_by_alias(registry.MODEL_NAME, registry.CHAMPION_ALIAS)
    assert after.version == champion.version
    assert len(client.search_model_versions(f"name='{registry.MODEL_NAME}'")) == versions
    return " ".join((result.stdout + result.stderr).split())


@pytest.fixture
def strict_s3_endpoint(tmp_path) -> Iterator[str]:
    """A moto server that checks credentials: only the first request (creating the bucket) is
    let through unauthenticated, and no IAM user exists, so every later key is refused."""
    port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("moto_server did not start")
                time.sleep(0.2)
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="any",
            aws_secret_access_key="any",
            region_name="us-east-1",
        ).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_refused_credentials_fail_the_run_early_and_keep_the_champion(
    s3_run, strict_s3_endpoint, mlflow_server
):
    project, _, _ = s3_run
    output = failed_run_keeping_the_champion(project, strict_s3_endpoint, mlflow_server)
    assert f"S3 bucket '{BUCKET}' at {strict_s3_endpoint} refused the credentials" in output
    assert "Running node" not in output


def test_ingest_uploads_mednist_into_an_empty_bucket(
    tmp_path, s3, s3_endpoint, sample_dir, http_server
):
    from tests.conftest import build_mednist_tarball

    url, www, _ = http_server
    tarball = build_mednist_tarball(sample_dir, www / "MedNIST.tar.gz")
    import hashlib

    md5 = hashlib.md5(tarball.read_bytes(), usedforsecurity=False).hexdigest()
    project = make_project(tmp_path / "project")
    prefix = "ingest-test"
    result = kedro_s3(
        project,
        s3_endpoint,
        "--pipeline",
        "data_processing",
        "--params",
        f"ingest.url={url}/MedNIST.tar.gz,ingest.md5={md5}",
        MEDICAL_CT_S3_PREFIX=prefix,
        MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}",
    )
    assert_ok(result)
    uploaded = s3.find(f"{BUCKET}/{prefix}/01_raw/mednist")
    assert len(uploaded) == len(list(sample_dir.glob("*/*.jpeg")))
    assert s3.exists(f"{BUCKET}/{prefix}/05_model_input/train/index.parquet")


def event_queue(endpoint: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The README's set-up: an SQS queue that receives the S3 events of ``BUCKET/prefix``."""
    with monkeypatch.context() as patch:
        for name, value in bucket_env(endpoint, BUCKET).items():
            patch.setenv(name, value)
        return create_event_queue(BUCKET, prefix, queue_name=prefix.strip("/").replace("/", "-"))


S3_KEYS = {
    "aws_access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
    "aws_secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
}


def waiting_messages(endpoint: str, url: str) -> int:
    sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1", **S3_KEYS)
    attributes = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    counts = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=attributes)["Attributes"]
    return sum(int(count) for count in counts.values())


def test_a_rerun_after_adding_changing_and_deleting_equals_a_full_rescan(
    tmp_path, s3, s3_endpoint, sample_dir, monkeypatch
):
    """The rerun finds the raw store's changes from the bucket's events (no full listing);
    the rescan lists every key: both give the same model input."""
    prefix = "rescan-test"
    root = f"{BUCKET}/{prefix}"
    queue = event_queue(s3_endpoint, f"{prefix}/01_raw/mednist/", monkeypatch)
    upload_images(s3, sorted(sample_dir.glob("*/*.jpeg")), root)
    project = make_project(tmp_path / "project")
    logs = []

    def run(*params: str) -> dict:
        result = kedro_s3(
            project,
            s3_endpoint,
            "--pipeline",
            "data_processing",
            *params,
            MEDICAL_CT_S3_PREFIX=prefix,
            MEDICAL_CT_RAW_CHANGE_QUEUE=queue,
            MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}",
        )
        assert_ok(result)
        logs.append(" ".join((result.stdout + result.stderr).split()))
        return json.loads(s3.cat_file(f"{root}/08_reporting/data_report.json"))

    def put(key: str, content: bytes) -> None:
        s3.pipe_file(f"{root}/{key}", content)

    seed_feedback(put, sample_dir)
    first = run()
    read_again = add_change_and_delete(put, lambda key: s3.rm_file(f"{root}/{key}"), sample_dir)
    rerun = run()
    rerun_rows = model_input_rows(f"s3://{root}", s3_endpoint)
    rescan = run("--params", "data_processing.full_rescan=true")

    files = rerun["raw_images_decoded"] + rerun["feedback_images_decoded"]
    assert rerun["files_reused_from_last_run"] == files - read_again
    assert rescan["files_reused_from_last_run"] == 0
    assert rerun["dataset_fingerprint"] == rescan["dataset_fingerprint"]
    assert rerun["dataset_fingerprint"] != first["dataset_fingerprint"]
    assert rerun_rows == model_input_rows(f"s3://{root}", s3_endpoint)
    assert not any(key.endswith(".pkl") for key in s3.find(f"{root}/02_intermediate"))
    assert "listing every file (no saved listing yet)" in logs[0]
    assert "3 keys asked again" in logs[1] and "(no full listing)" in logs[1]
    assert "listing every file (full_listing is set)" in logs[2]
    assert waiting_messages(s3_endpoint, queue) == 0


def test_listing_more_than_a_thousand_objects_pages_through_them(s3, s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    root = f"{BUCKET}/many/01_raw"
    keys = {f"{root}/Hand/{index:05d}.jpeg": str(index).encode() for index in range(1300)}
    keys |= {f"{root}/CXR/{index:05d}.jpeg": str(index).encode() for index in range(1300, 2600)}
    s3.pipe({**keys, f"{root}/loose.jpeg": b"outside a class folder"})
    dataset = ImageFolderDataset(path=f"s3://{root}", fs_args={"skip_instance_cache": True})
    files = dataset.load()  # one listing per class folder, in threads
    assert len(files) == 2601 and files["loose.jpeg"]() == b"outside a class folder"
    assert files["Hand/00000.jpeg"]() == b"0" and files["CXR/02599.jpeg"]() == b"2599"
    assert files["Hand/00000.jpeg"].version != files["Hand/00001.jpeg"].version
    cache_off = {"fs_args": {"skip_instance_cache": True}}
    assert FolderHasFilesDataset(path=f"s3://{root}", **cache_off).load() is True
    assert FolderHasFilesDataset(path=f"s3://{BUCKET}/nothing/here", **cache_off).load() is False


def test_records_are_read_together_and_checked_as_one_at_a_time_would(s3, s3_endpoint, monkeypatch):
    """The review's first look and a full rescan read every record: one GET at a time waited
    out the store's latency once a record. ``fetched`` reads them in one gathered ``cat``
    (they are in hand before a loader is called) and judges each as its own read would."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    root = f"{BUCKET}/records-read-together"
    store = RecordsDataset(path=f"s3://{root}", credentials={"skip_instance_cache": True})
    store.save({f"Hand-{index}": {"label": "Hand", "index": index} for index in range(300)})
    s3.pipe(f"{root}/Hand-broken.json", b'{"label": "Ha')  # edited by hand
    loaders = store.load()
    together = loaders.fetched(list(loaders))
    s3.rm(root, recursive=True)  # what was fetched is in hand; a lone loader reads the bucket
    assert together["Hand-7"]() == {"label": "Hand", "index": 7}
    assert [read_record(together[f"Hand-{index}"])[1] for index in range(300)] == [None] * 300
    assert read_record(together["Hand-broken"]) == (
        None,
        "Unterminated string starting at: line 1 column 11 (char 10)",
    )
    with pytest.raises(FileNotFoundError):
        loaders["Hand-7"]()


def test_a_record_is_found_by_its_name_in_the_bucket_not_in_a_cached_listing(
    s3, s3_endpoint, monkeypatch
):
    """A decision asks the decision stores about its one id (``has``: a HEAD) instead of
    listing every record ever decided. s3fs answers ``exists`` from its listing cache once the
    folder was listed in the process: a record another replica wrote since must be found. A
    look reads the records a journal names by their ids, gathered: a missing one is none, as
    one read alone is."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    root = f"{BUCKET}/records-found-by-name"
    # Its own client: a shared one would keep this test's endpoint for later tests' clients.
    store = RecordsDataset(path=f"s3://{root}", credentials={"skip_instance_cache": True})
    store.save({"Hand-1": {"label": "Hand"}})
    assert list(store.load()) == ["Hand-1"] and not store.has("Hand-2")  # listed: cached
    replica = fsspec.filesystem("s3", skip_instance_cache=True)  # another process's client
    replica.pipe(f"{root}/Hand-2.json", b"[1, 2")  # found even if it cannot be read

    assert store.has("Hand-2") and store.has("Hand-1") and not store.has("Hand-3")
    with pytest.raises(DatasetError, match="would leave"):
        store.has("../Hand-1")
    loaders = store.loaders(["Hand-1", "Hand-2", "Hand-3", "../Hand-1"])
    read = fetched(loaders, loaders.keys())
    assert sorted(read) == ["Hand-1", "Hand-2", "Hand-3"] and read["Hand-1"]() == {"label": "Hand"}
    with pytest.raises(DatasetError, match="not JSON"):
        read["Hand-2"]()
    with pytest.raises(FileNotFoundError):
        read["Hand-3"]()


def test_an_index_kept_from_a_save_is_checked_against_the_bucket_not_a_cached_listing(
    s3, s3_endpoint, sample_dir
):
    """A dataset hands its run's later nodes the index it saved while the object's ETag is
    the one it wrote. s3fs answers ``checksum`` from its listing cache once the folder has been
    listed in the process: the check asks the bucket (a HEAD), so an index another run wrote
    in between is read."""
    credentials = {
        "endpoint_url": s3_endpoint,
        "key": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "secret": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }
    files = {
        f"{path.parent.name}/{path.name}": (lambda path=path: path.read_bytes())
        for path in sorted(sample_dir.glob("*/*.jpeg"))[::24]
    }
    params = {"classes": None, "split": {"validation_fraction": 0.2, "test_fraction": 0.2}}
    folder = f"{BUCKET}/kept-index/decoded"
    store = ShardedImagesDataset(path=f"s3://{folder}", credentials=credentials)
    store.save(decode_images(files, None, params))
    fsspec.filesystem("s3", **credentials).ls(folder)  # the store's client: fsspec shares it

    other = decode_images({name: files[name] for name in sorted(files)[:4]}, None, params)
    buffer = io.BytesIO()
    other.index.to_parquet(buffer, index=False)
    s3.pipe(f"{folder}/index.parquet", buffer.getvalue())  # another run, another client

    assert store.load()["files"] == sorted(files)[:4]


def test_one_catalog_serves_both_environments_and_s3_moves_every_persisted_dataset(monkeypatch):
    """The s3 environment changes one variable (``root``), so no entry can be left on disk."""
    from kedro.config import OmegaConfigLoader

    from medical_ct.settings import CONFIG_LOADER_ARGS

    monkeypatch.setenv("MEDICAL_CT_S3_BUCKET", "a-bucket")
    monkeypatch.setenv("MEDICAL_CT_S3_PREFIX", "a/prefix")
    assert not (PROJECT_ROOT / "conf/s3/catalog.yml").exists()

    def locations(env: str) -> dict[str, list[str]]:
        loader = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), env=env, **CONFIG_LOADER_ARGS)
        found = {}
        for name, entry in loader["catalog"].items():
            nested = entry.get("dataset") if isinstance(entry.get("dataset"), dict) else {}
            paths = [entry.get("path"), entry.get("filepath"), nested.get("filepath")]
            paths += [entry.get("legacy", {}).get("filepath")]
            paths += [folder["path"] for folder in entry.get("shards_from", {}).values()]
            if any(paths):
                found[name] = [path for path in paths if path]
        return found

    local, s3 = locations("local"), locations("s3")
    assert set(local) == set(s3) and len(local) > 25
    for name, paths in s3.items():
        assert all(path.startswith("s3://a-bucket/a/prefix/") for path in paths), name
        assert all(path.startswith("data/") for path in local[name]), name


def test_events_patch_the_listing_and_anything_doubtful_lists_every_key(
    s3, s3_endpoint, monkeypatch, caplog
):
    """Events are hints (each key is asked again); a message that is not an S3 event, a stale
    listing or ``full_listing`` list every key instead; the odd message is shown, not lost."""
    for name, value in bucket_env(s3_endpoint, BUCKET).items():
        monkeypatch.setenv(name, value)
    root = f"{BUCKET}/events/01_raw"
    queue = event_queue(s3_endpoint, "events/01_raw/", monkeypatch)
    s3.pipe({f"{root}/Hand/{index}.jpeg": b"x" * index for index in range(1, 6)})

    listing = f"s3://{BUCKET}/events/listing.parquet"

    def load(**changes) -> dict[str, str]:
        changes = {"queue_url": queue, "filepath": listing} | changes
        dataset = ImageFolderDataset(
            path=f"s3://{root}", fs_args={"skip_instance_cache": True}, changes=changes
        )
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="medical_ct.changes"):
            files = dataset.load()
        assert waiting_messages(s3_endpoint, queue) == 0
        return {name: file.version for name, file in files.items()}

    def listed() -> dict[str, str]:
        dataset = ImageFolderDataset(path=f"s3://{root}", fs_args={"skip_instance_cache": True})
        return {name: file.version for name, file in dataset.load().items()}

    assert load() == listed() and "no saved listing yet" in caplog.text
    with s3.open(listing) as file:  # rewritten every run: zstd, half the bytes of snappy
        assert pq.ParquetFile(file).metadata.row_group(0).column(0).compression == "ZSTD"
    s3.pipe({f"{root}/CXR/a b+c.jpeg": b"new", f"{root}/Hand/1.jpeg": b"changed"})
    s3.rm_file(f"{root}/Hand/2.jpeg")
    s3.pipe_file(f"{root}/CXR/a b+c.jpeg", b"changed twice")  # two events, one key
    s3.pipe_file(f"{BUCKET}/events/elsewhere.jpeg", b"outside the prefix: no event")
    assert load() == listed() and "3 keys asked again" in caplog.text
    assert "listing every file" not in caplog.text

    sqs = boto3.client("sqs", endpoint_url=s3_endpoint, region_name="us-east-1", **S3_KEYS)
    sqs.send_message(QueueUrl=queue, MessageBody="written by hand")
    s3.rm_file(f"{root}/Hand/3.jpeg")
    assert load() == listed()
    assert "'written by hand'" in caplog.text and "is not an S3 event" in caplog.text
    assert "listing every file (a queue message is not an S3 event" in caplog.text
    assert load(full_listing=True) == listed() and "(full_listing is set)" in caplog.text
    assert load(full_listing_days=0) == listed() and "over 0 days old" in caplog.text
    assert load(queue_retention_days=0) == listed() and "dropped events" in caplog.text
    s3.pipe_file(listing, b"not Parquet")
    assert load() == listed() and "is not a readable listing" in caplog.text
    with pytest.raises(DatasetError, match="`queue_url` with an S3 path"):
        ImageFolderDataset(path="data/01_raw", changes={"queue_url": queue, "filepath": "x"})


def test_an_empty_short_poll_answer_does_not_end_reading_the_events(s3, s3_endpoint, monkeypatch):
    """A short poll (``WaitTimeSeconds=0``) asks a subset of SQS's servers: AWS documents that
    it may answer no message while some wait. Here the first short poll answers so (through
    botocore's events, before the request leaves; moto answers everything else): the rerun
    must still read every event, which only long polls, whose empty answer means drained, do.
    """
    for name, value in bucket_env(s3_endpoint, BUCKET).items():
        monkeypatch.setenv(name, value)
    root = f"{BUCKET}/false-empty/01_raw"
    queue = event_queue(s3_endpoint, "false-empty/01_raw/", monkeypatch)
    s3.pipe({f"{root}/Hand/{index}.jpeg": b"x" * index for index in range(1, 4)})
    changes = {"queue_url": queue, "filepath": f"s3://{BUCKET}/false-empty/listing.parquet"}

    def load(**settings) -> dict[str, str]:
        dataset = ImageFolderDataset(
            path=f"s3://{root}", fs_args={"skip_instance_cache": True}, **settings
        )
        return {name: file.version for name, file in dataset.load().items()}

    load(changes=changes)  # the first run lists every key
    s3.pipe_file(f"{root}/CXR/new.jpeg", b"new")
    s3.rm_file(f"{root}/Hand/2.jpeg")

    waits: list[int] = []

    def note_the_wait(params, context, **_) -> None:
        context["wait"] = params.get("WaitTimeSeconds", 0)
        waits.append(context["wait"])

    def answer_the_first_short_poll_empty(context, **_):
        if context["wait"] == 0 and waits.count(0) == 1:
            return AWSResponse(queue, 200, {}, None), {}
        return None

    session = boto3.Session()  # the feed's client is made from the default session
    session.events.register("before-parameter-build.sqs.ReceiveMessage", note_the_wait)
    session.events.register("before-call.sqs.ReceiveMessage", answer_the_first_short_poll_empty)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", session)
    assert load(changes=changes) == load()
    assert waits and min(waits) >= 1
    assert waiting_messages(s3_endpoint, queue) == 0
