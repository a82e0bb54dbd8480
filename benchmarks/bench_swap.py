"""/predict while the champion moves: how long the slowest answers wait, this tree against
another git ref, side by side in one run.

    .venv/bin/python benchmarks/bench_swap.py --against REF [--moves 8] [--busy 2]
        [--rounds 2] [--project P]

1. Trains two versions on the 240-image sample in a temporary project (or uses ``--project``,
   whose registry holds versions 1 and 2).
2. For each tree (this one, and a worktree of ``--against``): ``bentoml serve`` of that tree's
   service (2 workers, the champion polled every 2 s); 4 clients send POST /predict without
   pause while the ``champion`` alias moves between versions 1 and 2 ``--moves`` times, 6 s
   apart. ``--busy N`` processes spin meanwhile, standing for the other work CI runs on the
   same cores (0: a quiet machine). Rounds interleave the trees; each keeps its best round.
3. Prints answers, failures (a 503 "overloaded" is an answer that waited past
   ``max_latency_ms``), p50, p99 and the slowest answer, and the slowest's ratio.
"""

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import (
    BIN,
    FAST_RUN_PARAMS,
    SAMPLE_DIR,
    free_port,
    multipart,
    project_env,
    running_server,
    train_project,
)
from project import checkouts, uptime

from medical_ct.registry import CHAMPION_ALIAS, MODEL_NAME


def two_versions(root: Path) -> Path:
    """A project whose registry holds two versions: a default run, then a retraining."""
    project = train_project(root)
    params = f"{FAST_RUN_PARAMS},retrain_on_same_data=true,champion_gate.min_improvement=-1"
    subprocess.run(
        [str(BIN / "kedro"), "run", "--params", params],
        cwd=project, env=project_env(project), check=True, capture_output=True,
    )  # fmt: skip
    return project


def predict_while_moving(port: int, project: Path, moves: int) -> dict:
    """4 clients on /predict while the alias moves ``moves`` times; latencies and failures."""
    from mlflow import MlflowClient

    registry = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    body, content_type = multipart(next(SAMPLE_DIR.rglob("*.jpeg")).read_bytes())
    latencies, failures, stop = [], [], threading.Event()

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while not stop.is_set():
            started = time.perf_counter()
            connection.request("POST", "/predict", body, {"Content-Type": content_type})
            response = connection.getresponse()
            payload = response.read()
            if response.status == 200:
                latencies.append(time.perf_counter() - started)
            else:
                failures.append(f"{response.status} {payload[:120]!r}")

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        for move in range(moves):
            time.sleep(6 if move else 3)
            version = "1" if move % 2 == 0 else "2"
            registry.set_registered_model_alias(MODEL_NAME, CHAMPION_ALIAS, version)
        time.sleep(6)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    registry.set_registered_model_alias(MODEL_NAME, CHAMPION_ALIAS, "2")
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "answers": len(latencies),
        "failures": failures,
        "p50_ms": cuts[49] * 1000,
        "p99_ms": cuts[98] * 1000,
        "max_ms": max(latencies) * 1000,
    }


def measure(tree: Path, project: Path, moves: int) -> dict:
    """``tree``'s service (2 workers, the champion polled every 2 s) while the alias moves."""
    port = free_port()
    command = [str(BIN / "bentoml"), "serve", "service:MedicalCT", "--port", str(port)]
    env = {"MEDICAL_CT_MODEL_POLL_INTERVAL_S": "2", "MEDICAL_CT_WORKERS": "2"}
    with running_server(
        command, port, project, cwd=tree, PYTHONPATH=str(tree / "src"),
        BENTOML_HOME=str(project / "bentoml-home"), **env,
    ):  # fmt: skip
        return predict_while_moving(port, project, moves)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="a git ref to compare with")
    parser.add_argument("--moves", type=int, default=8)
    parser.add_argument("--busy", type=int, default=2, help="spinning processes (0: quiet)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--project", type=Path, help="registry with versions 1 and 2")
    args = parser.parse_args()
    print(f"start: {uptime()}", flush=True)
    with (
        tempfile.TemporaryDirectory(prefix="bench_swap_") as scratch,
        checkouts(args.against) as trees,
    ):
        if args.project:
            project = args.project.resolve()
        else:
            print("Training two versions on the sample...", flush=True)
            project = two_versions(Path(scratch) / "project")
        spin = [sys.executable, "-c", "while True: pass"]
        busy = [subprocess.Popen(spin) for _ in range(args.busy)]
        results: dict[str, dict] = {}
        try:
            for round_ in range(args.rounds):
                for name, tree in trees.items():
                    print(f"Round {round_ + 1}: {name}...", flush=True)
                    result = measure(tree, project, args.moves)
                    if name not in results or result["max_ms"] < results[name]["max_ms"]:
                        results[name] = result
        finally:
            for process in busy:
                process.kill()
    print(
        f"\n{args.moves} moves of the alias, 4 clients, 2 workers, {args.busy} busy processes, "
        f"{os.cpu_count()} CPUs; end: {uptime()}"
    )
    print(f"{'':16}{'answers':>9}{'failed':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for name, result in results.items():
        print(
            f"{name:16}{result['answers']:9d}{len(result['failures']):8d}"
            f"{result['p50_ms']:9.1f}{result['p99_ms']:9.1f}{result['max_ms']:9.1f}"
        )
        if result["failures"]:
            print(f"  first failures: {result['failures'][:2]}")
    this, other = results["this tree"], results[args.against]
    print(f"\nslowest answer: this tree {this['max_ms'] / other['max_ms']:.2f} of {args.against}'s")


if __name__ == "__main__":
    main()
