"""Shared fixtures: temporary Kedro projects, real `kedro run` subprocesses, real sqlite MLflow."""

import contextlib
import functools
import http.server
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = (PROJECT_ROOT / "../shared/data/mednist/sample").resolve()
CLASSES = ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"]
KEDRO = str(Path(sys.executable).with_name("kedro"))
# Small and fast on the 240-image sample; the real settings are exercised by benchmarks/.
FAST_RUN_PARAMS = (
    "training.max_epochs=6,training.batch_size=16,training.learning_rate=0.005,"
    "training.patience=6,champion_gate.min_accuracy=0.7,"
    "champion_gate.min_class_recall=0.5,champion_gate.max_ece=0.5,min_new_images=1"
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e/ is end to end; elsewhere a module or test says so itself."""
    e2e = Path(__file__).parent / "e2e"
    for item in items:
        if e2e in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    if not SAMPLE_DIR.is_dir():
        pytest.fail(f"the MedNIST sample is missing: expected {SAMPLE_DIR}")
    return SAMPLE_DIR


def make_project(root: Path, raw_images_from: Path | None = None) -> Path:
    """A Kedro project using this repo's conf and installed package, with its own data and store."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(PROJECT_ROOT / "conf", root / "conf", dirs_exist_ok=True)
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy(PROJECT_ROOT / name, root / name)
    for folder in ("src", "notebooks"):
        (root / folder).mkdir(exist_ok=True)
    if raw_images_from is not None:
        shutil.copytree(raw_images_from, root / "data/01_raw/mednist")
    return root


@contextlib.contextmanager
def file_size_limit(size: int) -> Iterator[None]:
    """Writes past ``size`` bytes of a file fail (EFBIG), as on a disk that fills up."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an OSError, not a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def project_env(project: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ}
    for inherited in ("KEDRO_ENV", "MLFLOW_REGISTRY_URI"):
        env.pop(inherited, None)
    return {
        **env,
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
        "KEDRO_DISABLE_TELEMETRY": "1",
        "PYTHONUNBUFFERED": "1",
        "COLUMNS": "200",
        # This checkout's code, also when the venv's editable install points at another one.
        "PYTHONPATH": str(PROJECT_ROOT / "src"),
        **extra,
    }


def kedro(project: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real kedro CLI in ``project``; output is kept for assertions and failures."""
    return subprocess.run(
        [KEDRO, *args],
        cwd=project,
        env=project_env(project),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_ingest(project: Path, url: str, md5: str) -> subprocess.CompletedProcess:
    """``kedro run`` of the ingest node alone, downloading MedNIST from ``url``."""
    return kedro(
        project,
        "run",
        "--nodes",
        "ingest_mednist",
        "--params",
        f"ingest.url={url},ingest.md5={md5}",
    )


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def mlflow_client(project: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory, sample_dir) -> Path:
    """A project after one whole default `kedro run` on the 240-image sample."""
    project = make_project(tmp_path_factory.mktemp("trained") / "project", sample_dir)
    result = kedro(project, "run", "--params", FAST_RUN_PARAMS)
    assert_ok(result)
    return project


def build_mednist_tarball(sample: Path, destination: Path) -> Path:
    """A tarball in the public MedNIST layout, MedNIST/<Class>/<file>.jpeg, from the sample."""
    with tarfile.open(destination, "w:gz") as tar:
        tar.add(sample, arcname="MedNIST")
    return destination


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self):
        self.server.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(tmp_path) -> Iterator[tuple[str, Path, list[str]]]:
    """A real HTTP server on a free loopback port serving ``tmp_path/www``."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(CountingHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root, server.requests
    finally:
        server.shutdown()
        server.server_close()


# ---- S3: moto's server mode on loopback, a real S3 API over HTTP ----
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API (moto's server mode) on a free loopback port, stopped afterwards."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_with_bucket(endpoint: str, bucket: str):
    """An s3fs client of the S3 server at ``endpoint``, with ``bucket`` created."""
    import s3fs

    filesystem = s3fs.S3FileSystem(
        endpoint_url=endpoint,
        key=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        secret=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        skip_instance_cache=True,
    )
    filesystem.mkdir(bucket)
    return filesystem


def bucket_env(endpoint: str, bucket: str, prefix: str = "", **extra: str) -> dict[str, str]:
    """The environment of a `kedro run --env s3` on ``s3://bucket/prefix`` at ``endpoint``."""
    return {
        **S3_CREDENTIALS,
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "MEDICAL_CT_S3_BUCKET": bucket,
        "MEDICAL_CT_S3_PREFIX": prefix,
        **extra,
    }


def read_model_input(data_root: str, split: str, endpoint: str | None = None):
    """One split of the model input as training reads it: ``images``, ``labels``,
    ``content_hashes``. ``data_root`` is a project's data/ or an s3 root (``s3://bucket/prefix``
    with the S3 server at ``endpoint``), laid out as conf/base/catalog.yml says."""
    from medical_ct.shards import ModelInputDataset

    credentials = None
    if endpoint is not None:
        credentials = {
            "endpoint_url": endpoint,
            "key": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "secret": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        }
    return ModelInputDataset(
        path=f"{data_root}/05_model_input/{split}",
        shards_from={
            "raw": f"{data_root}/02_intermediate/decoded_raw",
            "feedback": f"{data_root}/02_intermediate/decoded_feedback",
        },
        credentials=credentials,
    ).load()


FEEDBACK_ROOT = "01_raw/feedback_accepted/images"
FEEDBACK_RECORDS = "01_raw/feedback_accepted/records"
ACCEPT = {"decision": "accept", "reviewer": "tests", "decided_at": "2026-12-04T00:00:00+00:00"}


def accept_feedback(put: Callable[[str, bytes], None], accepted_as: str, image: bytes) -> None:
    """An accepted feedback image and the record that accepts it, as a review writes them
    (data_processing trains only on accepted images a record names)."""
    put(f"{FEEDBACK_ROOT}/{accepted_as}", image)
    label, name = accepted_as.split("/")
    feedback_id = f"{label}-{name.split('.')[0]}"
    record = {"feedback_id": feedback_id, "label": label, "accepted_as": accepted_as}
    put(f"{FEEDBACK_RECORDS}/{feedback_id}.json", json.dumps(record | ACCEPT).encode())


def seed_feedback(put: Callable[[str, bytes], None], sample: Path) -> None:
    """Two accepted feedback images: a relabelled sample image and a new one."""
    accept_feedback(put, "CXR/fb-1.jpeg", sorted(sample.glob("Hand/*.jpeg"))[2].read_bytes())
    accept_feedback(put, "Hand/fb-2.jpeg", sorted(sample.glob("ChestCT/*.jpeg"))[0].read_bytes())


def add_change_and_delete(
    put: Callable[[str, bytes], None], delete: Callable[[str], None], sample: Path
) -> int:
    """Add, change and delete files of the raw and the feedback stores (keys relative to the
    data root, as in the catalogs); returns how many files a rerun has to read (4)."""
    hand, cxr = sorted(sample.glob("Hand/*.jpeg")), sorted(sample.glob("CXR/*.jpeg"))
    put("01_raw/mednist/HeadCT/new-1.jpeg", sorted(sample.glob("AbdomenCT/*.jpeg"))[0].read_bytes())
    put(f"01_raw/mednist/Hand/{hand[0].name}", cxr[0].read_bytes())  # other pixels, same name
    delete(f"01_raw/mednist/CXR/{cxr[1].name}")
    accept_feedback(put, "HeadCT/fb-3.jpeg", cxr[2].read_bytes())
    put(f"{FEEDBACK_ROOT}/CXR/fb-1.jpeg", hand[3].read_bytes())
    delete(f"{FEEDBACK_ROOT}/Hand/fb-2.jpeg")
    return 4


def model_input_rows(data_root: str, endpoint: str | None = None) -> dict[str, tuple]:
    """Split -> (content hashes, labels, images) of the model input under ``data_root``."""
    rows = {}
    for split in ("train", "validation", "test"):
        data = read_model_input(data_root, split, endpoint)
        rows[split] = (data["content_hashes"], data["labels"].tolist(), data["images"].tobytes())
    return rows


def upload_images(s3, images: Iterable[Path], root: str) -> int:
    """Copy ``<Class>/<file>`` images into the raw store under ``root`` (bucket[/prefix])."""
    files = {
        f"{root}/01_raw/mednist/{path.parent.name}/{path.name}": path.read_bytes()
        for path in images
    }
    s3.pipe(files)
    return len(files)


# ---- the BentoML service (service.py) as a real `bentoml serve` subprocess ----
BENTOML = str(Path(sys.executable).with_name("bentoml"))


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def bentoml_server(
    project: Path, *serve_args: str, cwd: Path = PROJECT_ROOT, **extra_env: str
) -> Iterator[str]:
    """``bentoml serve`` of this repo's service for ``project`` on a free loopback port.

    Yields the base URL once ``/livez`` answers; the server's output is shown on failure.
    """
    port = free_port()
    log_path = project / f"bentoml-serve-{port}.log"
    # A BentoML home per server: two servers sharing one would wipe each other's metrics.
    home = {"BENTOML_HOME": str(project / f"bentoml-home-{port}")}
    env = project_env(project, **{"MEDICAL_CT_PROJECT_DIR": str(project), **home, **extra_env})
    args = serve_args or ("service:MedicalCT",)
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [BENTOML, "serve", *args, "--host", "127.0.0.1", "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(f"{url}/livez", server, log_path, timeout=120)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def wait_until_answers(
    url: str, process: subprocess.Popen, log: Path, timeout: float, interval: float = 0.5
) -> None:
    """Until ``url`` answers 200; fails with ``process``'s log if it exits or ``timeout`` passes.

    For the servers the tests start (bentoml serve, Prometheus, airflow standalone).
    """
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            output = log.read_text()[-5000:]
            pytest.fail(f"{url}: its server exited {process.returncode}:\n{output}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            pytest.fail(f"{url} did not answer within {timeout} s:\n{log.read_text()[-5000:]}")
        time.sleep(interval)


PREDICTION_LOG_DIR = Path("data/01_raw/prediction_log")


def read_prediction_log(project: Path):
    """Every record of a project's local prediction log, as one DataFrame."""
    import pandas as pd

    files = sorted((project / PREDICTION_LOG_DIR).rglob("*.parquet"))
    return pd.concat([pd.read_parquet(path) for path in files]) if files else pd.DataFrame()


def logged_records(project: Path, prediction_ids: list[str], timeout: float = 10):
    """The log's records of ``prediction_ids``, once all are written (the service's workers
    flush every second), or what is there after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        log = read_prediction_log(project)
        found = log[log["prediction_id"].isin(prediction_ids)] if len(log) else log
        if len(found) >= len(prediction_ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def jpeg(image: bytes, name: str = "image.jpeg") -> tuple[str, bytes, str]:
    """A multipart file of ``image`` as a browser or curl sends a .jpeg (the APIs take image/*)."""
    return name, image, "image/jpeg"


def wait_ready(url: str, timeout: float = 60, workers: int = 2) -> None:
    """Wait until every worker serves a model (``workers``: conf/base/serving.yml's default).

    /readyz answers 200 as soon as the worker that gets the probe has a model; a request to
    a worker still loading would get 503.
    """
    import httpx

    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/readyz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, f"{url} did not become ready"
        time.sleep(0.5)
    wait_workers_serving(url, workers, timeout=max(deadline - time.monotonic(), 5))


def served_versions(url: str) -> list[str]:
    """The model version each worker of the service reports in /metrics (one line per pid)."""
    import httpx

    lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
    return [
        line.rsplit(" ", 1)[1]
        for line in lines
        if line.startswith("medical_ct_serving_model_version{")
    ]


def wait_workers_serving(url: str, workers: int, timeout: float = 60) -> None:
    """Wait until every worker has loaded a model: /readyz answers as soon as one has."""
    deadline = time.monotonic() + timeout
    while True:
        versions = served_versions(url)
        if len(versions) == workers and "0.0" not in versions:
            return
        assert time.monotonic() < deadline, f"workers serving at {url}: {versions}"
        time.sleep(0.5)


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium (Playwright's own download needs the internet); installed if missing."""
    if not CHROMIUM.exists() and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium"],
            env=env,
            check=False,
            capture_output=True,
        )
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install chromium` (see the Makefile)")
    return CHROMIUM


@contextlib.contextmanager
def chromium_browser(executable: Path):
    """Headless Debian chromium driven by Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
