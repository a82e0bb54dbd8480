"""MedNIST download against a real local HTTP server: once, verified, nothing half-written."""

import hashlib

import pytest

from medical_ct.datasets import FolderHasFilesDataset, ImageFolderDataset
from medical_ct.mednist import MedNISTDownloadError, fetch_mednist
from tests.conftest import (
    assert_ok,
    build_mednist_tarball,
    file_size_limit,
    make_project,
    run_ingest,
)


@pytest.fixture
def served_tarball(http_server, sample_dir):
    base_url, root, requests = http_server
    tarball = build_mednist_tarball(sample_dir, root / "MedNIST.tar.gz")
    md5 = hashlib.md5(tarball.read_bytes()).hexdigest()
    return f"{base_url}/MedNIST.tar.gz", md5, requests


def test_fetch_returns_every_image_of_the_tarball(served_tarball, sample_dir):
    url, md5, requests = served_tarball
    images = fetch_mednist(url, md5)
    assert len(images) == 240
    some = next(iter(sorted(sample_dir.glob("Hand/*.jpeg"))))
    assert images[f"Hand/{some.name}"] == some.read_bytes()
    assert requests == ["/MedNIST.tar.gz"]


def test_wrong_checksum_and_unreachable_source_are_clear_errors(served_tarball, tmp_path):
    url, _, _ = served_tarball
    with pytest.raises(MedNISTDownloadError, match="expected 00000000"):
        fetch_mednist(url, "0" * 32)
    with pytest.raises(MedNISTDownloadError, match="could not download"):
        fetch_mednist(url.replace("MedNIST.tar.gz", "missing.tar.gz"), "0" * 32)
    with pytest.raises(MedNISTDownloadError, match="could not download"):
        fetch_mednist(str(tmp_path / "nowhere.tar.gz"), "0" * 32)


@pytest.mark.e2e
def test_ingest_downloads_once_into_the_raw_store(tmp_path, served_tarball):
    url, md5, requests = served_tarball
    project = make_project(tmp_path / "project")
    raw_store = project / "data/01_raw/mednist"

    assert_ok(run_ingest(project, url, md5))
    assert len(list(raw_store.glob("*/*.jpeg"))) == 240
    assert sorted(p.name for p in raw_store.iterdir()) == [
        "AbdomenCT",
        "BreastMRI",
        "CXR",
        "ChestCT",
        "Hand",
        "HeadCT",
    ]
    assert requests == ["/MedNIST.tar.gz"]

    second = run_ingest(project, url, md5)
    assert_ok(second)
    assert requests == ["/MedNIST.tar.gz"], "the second run downloaded again"
    assert "not downloading MedNIST" in second.stdout + second.stderr


def test_an_ingest_stopped_part_way_is_written_whole_by_its_retry(
    tmp_path, served_tarball, sample_dir
):
    """Ingest writes its files one by one (retried 4 times in the DAG): a retry after a
    failure part-way found files in the raw store, downloaded nothing, and the run trained on
    the part written."""
    url, md5, requests = served_tarball
    project = make_project(tmp_path / "project")
    raw_store = project / "data/01_raw/mednist"
    images = {
        f"{folder.name}/{path.name}": path.read_bytes()
        for folder in sorted(sample_dir.iterdir())
        for path in sorted(folder.iterdir())
    }
    limit = max(map(len, list(images.values())[:5])) + 1  # the first five fit, not all
    assert max(map(len, images.values())) > limit

    with file_size_limit(limit), pytest.raises(Exception, match="File too large"):
        ImageFolderDataset(path=str(raw_store)).save(images)
    written = len(list(raw_store.glob("*/*.jpeg")))
    retry = run_ingest(project, url, md5)

    assert 5 <= written < 240
    assert FolderHasFilesDataset(path=str(raw_store)).load() is True  # finished now
    assert_ok(retry)
    assert "stopped part-way" in retry.stdout + retry.stderr
    assert requests == ["/MedNIST.tar.gz"]
    assert len(list(raw_store.glob("*/*.jpeg"))) == 240


@pytest.mark.e2e
def test_ingest_with_a_wrong_checksum_fails_and_leaves_the_raw_store_empty(
    tmp_path, served_tarball
):
    url, _, _ = served_tarball
    project = make_project(tmp_path / "project")
    result = run_ingest(project, url, "f" * 32)
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0
    assert "expected ffffffffffffffffffffffffffffffff" in output
    assert "To provide the images yourself" in output
    raw_store = project / "data/01_raw/mednist"
    assert not raw_store.exists() or not any(raw_store.rglob("*"))
