"""Full `kedro run` on the MedNIST dev set versus a bare PyTorch loop, side by side.

    .venv/bin/python benchmarks/bench_pipeline.py [--archive PATH] [--keep]

1. Serves the tarball from a local HTTP server and runs the whole default pipeline in a fresh
   temporary project (download, md5, extract into the raw store, processing, training,
   evaluation, registration) with the project's default parameters.
2. Side by side on the tensors that run produced: the same model, optimiser and schedule for
   the same epochs in a bare PyTorch loop, then `kedro run --pipeline training` (Kedro start-up,
   catalog loads, MLflow logging included), then the bare loop again.
3. Prints wall times, per-node times (from the MLflow run), test accuracy and the ratios.
"""

import argparse
import functools
import hashlib
import http.server
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml
from mlflow.tracking import MlflowClient
from project import PROJECT_ROOT, make_project
from torch import nn

sys.path.insert(0, str(PROJECT_ROOT / "src"))

from medical_ct.model import build_classifier
from medical_ct.shards import ModelInputDataset

DEV_ARCHIVE = PROJECT_ROOT / "../shared/data/mednist/MedNIST-dev.tar.gz"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def bare_training_loop(data_dir: Path, params: dict, epochs: int) -> float:
    """The same model, optimiser and schedule as the training node, without Kedro or MLflow."""
    train, validation = (
        ModelInputDataset(
            path=str(data_dir / split),
            shards_from={
                "raw": str(data_dir.parent / "02_intermediate/decoded_raw"),
                "feedback": str(data_dir.parent / "02_intermediate/decoded_feedback"),
            },
        ).load()
        for split in ("train", "validation")
    )
    class_names = json.loads((data_dir / "class_names.json").read_text())
    started = time.perf_counter()
    torch.manual_seed(params["seed"])
    model = build_classifier(params["architecture"], len(class_names), params["width"])
    model = model.to(memory_format=torch.channels_last)
    images = torch.from_numpy(train["images"]).contiguous(memory_format=torch.channels_last)
    labels = torch.from_numpy(train["labels"])
    batch = params["batch_size"]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=params["learning_rate"], weight_decay=params["weight_decay"]
    )
    steps = params["max_epochs"] * -(-len(labels) // batch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=params["learning_rate"], total_steps=steps
    )
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(labels))
        for start in range(0, len(labels), batch):
            index = order[start : start + batch]
            loss = nn.functional.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        with torch.inference_mode():
            validation_images = torch.from_numpy(validation["images"])
            for start in range(0, len(validation_images), 1024):
                model(validation_images[start : start + 1024])
    return time.perf_counter() - started


def print_report(
    full_seconds: float,
    metrics: dict[str, float],
    epochs: int,
    bare: list[float],
    training_seconds: float,
    train_node_seconds: float,
) -> None:
    bare_seconds = statistics.mean(bare)
    node_seconds = {
        key.removeprefix("node_seconds."): value
        for key, value in metrics.items()
        if key.startswith("node_seconds.")
    }

    print(f"\nfull kedro run, download to registration: {full_seconds:7.1f} s")
    for name, seconds in sorted(node_seconds.items(), key=lambda item: -item[1]):
        print(f"  node {name:24s} {seconds:7.1f} s")
    print(
        f"test accuracy {metrics['test_accuracy']:.4%} ({int(metrics['test_errors'])} "
        f"errors in {int(metrics['data.test_images'])}), "
        f"{int(metrics['data.train_images'])} training images, {epochs} epochs"
    )
    print(f"\nbare PyTorch loop, same tensors:   {' / '.join(f'{s:.1f}' for s in bare)} s")
    print(
        f"kedro run --pipeline training:     {training_seconds:.1f} s "
        f"(train_model node {train_node_seconds:.1f} s)"
    )
    print(f"training pipeline / bare loop:     {training_seconds / bare_seconds:.3f}")
    print(f"train_model node / bare loop:      {train_node_seconds / bare_seconds:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=DEV_ARCHIVE)
    parser.add_argument("--keep", action="store_true", help="keep the temporary project")
    args = parser.parse_args()
    archive = args.archive.resolve()
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    workdir = Path(tempfile.mkdtemp(prefix="medical-ct-bench-"))
    project = make_project(workdir / "project")
    www = workdir / "www"
    www.mkdir()
    shutil.copy(archive, www / archive.name)
    server, base_url = serve(www)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    env["KEDRO_DISABLE_TELEMETRY"] = "1"
    kedro = str(Path(sys.executable).with_name("kedro"))
    params = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_training.yml").read_text())
    params = params["training"]
    print(f"archive {archive.name} (md5 {md5}), {os.cpu_count()} CPUs, torch {torch.__version__}")

    def kedro_run(*args: str) -> float:
        started = time.perf_counter()
        result = subprocess.run(
            [kedro, "run", *args], cwd=project, env=env, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            sys.exit(f"kedro run failed:\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}")
        return time.perf_counter() - started

    try:
        full_seconds = kedro_run(
            "--params", f"ingest.url={base_url}/{archive.name},ingest.md5={md5}"
        )
        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        experiment_id = client.get_experiment_by_name("medical_ct").experiment_id
        (full_run,) = client.search_runs([experiment_id])
        metrics = full_run.data.metrics
        epochs = len(client.get_metric_history(full_run.info.run_id, "val_loss"))
        data_dir = project / "data/05_model_input"
        # Side by side: bare loop, the training pipeline through Kedro, bare loop again.
        bare = [bare_training_loop(data_dir, params, epochs)]
        training_seconds = kedro_run(
            "--pipeline", "training", "--params", "retrain_on_same_data=true"
        )
        bare.append(bare_training_loop(data_dir, params, epochs))
        training_run = client.search_runs([experiment_id], order_by=["start_time DESC"])[0]
        train_node_seconds = training_run.data.metrics["node_seconds.train_model"]
        print_report(full_seconds, metrics, epochs, bare, training_seconds, train_node_seconds)
    finally:
        server.shutdown()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"project kept in {project}")


if __name__ == "__main__":
    main()
