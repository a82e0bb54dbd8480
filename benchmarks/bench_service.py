"""The BentoML service under load versus the model's ceiling and a naive server, side by side.

    .venv/bin/python benchmarks/bench_service.py [--requests 5000] [--concurrency 16]
        [--workers 2] [--rounds 2] [--project P]

1. Trains a champion on the 240-image sample in a temporary project (or uses ``--project``).
2. Starts ``bentoml serve`` (the real service) on a free loopback port and sends ``--requests``
   POST /predict from ``--concurrency`` keep-alive clients: throughput, p50/p95/p99, errors.
   For 1 and ``--workers`` workers, each with the prediction log off and on (pixels logged,
   the default), interleaved over ``--rounds`` rounds; each keeps its best round.
3. In the same run: the raw model's batched forward throughput on the same preprocessed images
   (the ceiling), and the same load against a naive server (one request, one forward pass).
"""

import argparse
import asyncio
import contextlib
import http.client
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "src"))
SAMPLE_DIR = (PROJECT_ROOT / "../shared/data/mednist/sample").resolve()
BIN = Path(sys.executable).parent
FAST_RUN_PARAMS = (
    "training.max_epochs=6,training.batch_size=16,training.learning_rate=0.005,"
    "training.patience=6,champion_gate.min_accuracy=0.7,"
    "champion_gate.min_class_recall=0.5,champion_gate.max_ece=0.5"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def project_env(project: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
        "MEDICAL_CT_PROJECT_DIR": str(project),
        "KEDRO_DISABLE_TELEMETRY": "1",
        "PYTHONPATH": str(PROJECT_ROOT / "src"),
        **extra,
    }


def train_project(root: Path) -> Path:
    shutil.copytree(PROJECT_ROOT / "conf", root / "conf")
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy(PROJECT_ROOT / name, root / name)
    (root / "src").mkdir()
    shutil.copytree(SAMPLE_DIR, root / "data/01_raw/mednist")
    subprocess.run(
        [str(BIN / "kedro"), "run", "--params", FAST_RUN_PARAMS],
        cwd=root,
        env=project_env(root),
        check=True,
        capture_output=True,
    )
    return root


def multipart(image: bytes) -> tuple[bytes, str]:
    """A browser's upload of a .jpeg: the APIs take files of type image/*."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.jpeg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def load(port: int, bodies: list[tuple[bytes, str]], requests: int, concurrency: int) -> dict:
    """``requests`` POST /predict from ``concurrency`` threads with keep-alive connections."""
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                break
            body, content_type = bodies[index % len(bodies)]
            started = time.perf_counter()
            try:
                connection.request("POST", "/predict", body, {"Content-Type": content_type})
                response = connection.getresponse()
                payload = response.read()
                status = response.status
            except OSError as error:
                errors.append(repr(error))
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            elapsed = time.perf_counter() - started
            with lock:
                if status == 200:
                    latencies.append(elapsed)
                else:
                    errors.append(f"{status} {payload[:200]!r}")
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "requests": requests,
        "ok": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "throughput": len(latencies) / wall,
        "p50_ms": cuts[49] * 1000,
        "p95_ms": cuts[94] * 1000,
        "p99_ms": cuts[98] * 1000,
    }


def wait_until_ready(port: int, process: subprocess.Popen, path: str = "/readyz") -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited {process.returncode}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", path)
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become ready")


@contextlib.contextmanager
def running_server(
    command: list[str], port: int, project: Path, cwd: Path = PROJECT_ROOT, **env: str
) -> Iterator[None]:
    """``command`` (a server on ``port``) run from ``cwd`` for ``project``, until ready; stopped
    after. Its output goes to ``project/server-<port>.log``."""
    with open(project / f"server-{port}.log", "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=project_env(project, **env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_ready(port, process)
        yield
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def measure_server(
    command: list[str], port: int, project: Path, bodies, requests: int, concurrency: int,
    **env: str,
) -> dict:  # fmt: skip
    with running_server(command, port, project, **env):
        load(port, bodies, min(300, requests), concurrency)  # warm-up
        return load(port, bodies, requests, concurrency)


def ceiling(project: Path, images: list[bytes], count: int, batch_size: int) -> float:
    """Images per second of the raw model's batched forward pass on preprocessed images."""
    import numpy as np

    from medical_ct import registry
    from medical_ct.model import predict_probabilities
    from medical_ct.preprocessing import preprocess_image

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    champion = registry.load_alias()
    pixels = np.stack([preprocess_image(image) for image in images])[:, None]
    batch = np.concatenate([pixels] * (count // len(pixels) + 1))[:count]
    predict_probabilities(champion.model, batch[:batch_size])  # warm-up
    started = time.perf_counter()
    predict_probabilities(champion.model, batch, batch_size=batch_size)
    return count / (time.perf_counter() - started)


def naive_server(port: int) -> None:
    """One request, one forward pass: no batching, the model behind a lock."""
    import numpy as np
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from medical_ct import registry
    from medical_ct.model import predict_probabilities
    from medical_ct.preprocessing import preprocess_image

    champion = registry.load_alias()
    model_lock = threading.Lock()

    def classify(image: bytes) -> dict:
        pixels = preprocess_image(image)[None, None]
        with model_lock:
            probabilities = predict_probabilities(champion.model, pixels)[0]
        best = int(np.argmax(probabilities))
        return {"label": champion.class_names[best], "confidence": float(probabilities[best])}

    async def predict(request):
        form = await request.form()
        image = await form["image"].read()
        return JSONResponse(await asyncio.to_thread(classify, image))

    async def ready(_):
        return JSONResponse({})

    app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/readyz", ready)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="the scaled-out service")
    parser.add_argument("--rounds", type=int, default=2, help="best of this many per service")
    parser.add_argument("--project", type=Path, help="a trained project (default: train one)")
    parser.add_argument("--naive-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_server:
        naive_server(args.naive_server)
        return
    with tempfile.TemporaryDirectory(prefix="bench_service_") as temporary:
        if args.project:
            project = args.project.resolve()
        else:
            print("Training a champion on the sample...", flush=True)
            project = train_project(Path(temporary) / "project")
        images = [path.read_bytes() for path in sorted(SAMPLE_DIR.rglob("*.jpeg"))]
        bodies = [multipart(image) for image in images]

        configurations = {
            f"service {workers}w, log {'on' if logged else 'off'}": {
                "MEDICAL_CT_WORKERS": str(workers),
                "MEDICAL_CT_PREDICTION_LOG": str(logged).lower(),
            }
            for workers in (1, args.workers)
            for logged in (False, True)
        }
        # Rounds interleave the configurations, and each keeps its best round: a burst of
        # other work on the machine then slows one round of one configuration, not the ratio.
        services: dict[str, dict] = {}
        for round_ in range(args.rounds):
            for name, env in configurations.items():
                port = free_port()
                print(f"Round {round_ + 1}: {name}...", flush=True)
                result = measure_server(
                    [str(BIN / "bentoml"), "serve", "service:MedicalCT", "--port", str(port)],
                    port, project, bodies, args.requests, args.concurrency, **env,
                )  # fmt: skip
                if name not in services or result["throughput"] > services[name]["throughput"]:
                    services[name] = result
        raw = ceiling(project, images, args.requests, batch_size=64)
        port = free_port()
        naive = measure_server(
            [sys.executable, __file__, "--naive-server", str(port)],
            port, project, bodies, args.requests, args.concurrency,
        )  # fmt: skip

    load_1m = os.getloadavg()[0]
    print(
        f"\n{args.requests} requests, concurrency {args.concurrency}, {os.cpu_count()} CPUs, "
        f"load average (1 min) at the end: {load_1m:.2f}"
    )
    print(f"{'':28}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for name, result in (*services.items(), ("naive server", naive)):
        print(
            f"{name:28}{result['throughput']:9.1f}{result['p50_ms']:9.1f}"
            f"{result['p95_ms']:9.1f}{result['p99_ms']:9.1f}{result['errors']:8d}"
        )
        if result["first_errors"]:
            print(f"  first errors: {result['first_errors']}")
    print(f"{'raw batched forward':28}{raw:9.1f}   (images/s, batch 64: the ceiling)")
    base = services["service 1w, log off"]["throughput"]
    print()
    for name, result in services.items():
        print(
            f"{name:28}{result['throughput'] / base:6.2f}x of 1w log off   "
            f"{result['throughput'] / raw:6.1%} of the ceiling   "
            f"{result['throughput'] / naive['throughput']:5.2f}x the naive server"
        )


if __name__ == "__main__":
    main()
