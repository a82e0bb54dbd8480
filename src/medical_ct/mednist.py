"""Download and unpack the public MedNIST tarball (MONAI project, CC BY-SA 4.0)."""

import hashlib
import logging
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from tqdm.auto import tqdm

from medical_ct.redaction import redact_url

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20


class MedNISTDownloadError(RuntimeError):
    """MedNIST could not be fetched or verified; the message says how to provide the images."""


def download_archive(url: str, md5: str, destination: Path, timeout_s: float = 60.0) -> Path:
    """Fetch ``url`` into ``destination`` with a progress bar and verify its md5.

    ``url`` may be ``http(s)://``, ``file://`` or a plain local path. The file appears at
    ``destination`` only once it is complete and its checksum matches.

    Raises:
        MedNISTDownloadError: The source is unreachable or the checksum does not match.
    """
    source = url if urlparse(url).scheme else Path(url).resolve().as_uri()
    destination.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.md5(usedforsecurity=False)
    with tempfile.NamedTemporaryFile(dir=destination.parent, delete=False) as partial:
        partial_path = Path(partial.name)
        try:
            with urllib.request.urlopen(source, timeout=timeout_s) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(
                    total=total, unit="B", unit_scale=True, desc="Downloading MedNIST"
                ) as progress:
                    while chunk := response.read(_CHUNK_BYTES):
                        partial.write(chunk)
                        digest.update(chunk)
                        progress.update(len(chunk))
        except (urllib.error.URLError, OSError, ValueError) as error:
            partial_path.unlink(missing_ok=True)
            raise MedNISTDownloadError(f"could not download {redact_url(url)}: {error}") from error
    if digest.hexdigest() != md5.lower():
        partial_path.unlink(missing_ok=True)
        raise MedNISTDownloadError(
            f"the file at {redact_url(url)} has md5 {digest.hexdigest()}, expected {md5}: "
            "the download is corrupt or it is not the MedNIST tarball"
        )
    return partial_path.replace(destination)


def read_images(archive: Path) -> dict[str, bytes]:
    """Read the images of a MedNIST tarball as ``{"<Class>/<file>": bytes}``.

    The public tarball holds ``MedNIST/<Class>/<file>.jpeg``; members outside a class folder
    (licences, readmes) are left out.
    """
    images: dict[str, bytes] = {}
    with tarfile.open(archive, mode="r:*") as tar:
        for member in tqdm(tar, desc="Reading MedNIST", unit=" files"):
            parts = PurePosixPath(member.name).parts
            if not member.isfile() or len(parts) != 3 or parts[1].startswith("."):
                continue
            with tar.extractfile(member) as file:
                images[f"{parts[1]}/{parts[2]}"] = file.read()
    if not images:
        raise MedNISTDownloadError(
            f"{archive.name} holds no images in the MedNIST layout MedNIST/<Class>/<file>"
        )
    return images


def fetch_mednist(url: str, md5: str, timeout_s: float = 60.0) -> dict[str, bytes]:
    """Download the tarball to a temporary folder, verify it and return its images."""
    workdir = Path(tempfile.mkdtemp(prefix="mednist-"))
    try:
        archive = download_archive(url, md5, workdir / "MedNIST.tar.gz", timeout_s)
        return read_images(archive)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
