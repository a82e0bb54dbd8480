"""Full `kedro run` on the MedNIST dev set versus a bare PyTorch loop, side by side.

    .venv/bin/python benchmarks/bench_pipeline.py [--archive PATH] [--keep]

1. Serves the tarball from a local HTTP server and runs the whole default pipeline in a fresh
   temporary project (download, md5, extract into the raw store, processing, training,
   evaluation, registration) with the project's default parameters.
2. Then trains the same model on the same tensors (the pipeline's train and validation sets)
   for the same number of epochs with a bare PyTorch loop, twice, and takes the mean.
3. Prints wall times, per-node times (from the MLflow run), test accuracy and the ratios.
"""

import argparse
import functools
import hashlib
import http.server
import json
import os
import pickle
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
from torch import nn

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "src"))

from medical_ct.model import build_classifier  # noqa: E402

DEV_ARCHIVE = PROJECT_ROOT / "../shared/data/mednist/MedNIST-dev.tar.gz"


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def make_project(root: Path) -> Path:
    shutil.copytree(PROJECT_ROOT / "conf", root / "conf")
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy(PROJECT_ROOT / name, root / name)
    (root / "src").mkdir()
    return root


def bare_training_loop(data_dir: Path, params: dict, epochs: int) -> float:
    """The same model, optimiser and schedule as the training node, without Kedro or MLflow."""
    train = pickle.loads((data_dir / "train_set.pkl").read_bytes())
    validation = pickle.loads((data_dir / "validation_set.pkl").read_bytes())
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
    try:
        started = time.perf_counter()
        result = subprocess.run(
            [kedro, "run", "--params", f"ingest.url={base_url}/{archive.name},ingest.md5={md5}"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        pipeline_seconds = time.perf_counter() - started
        if result.returncode != 0:
            sys.exit(f"kedro run failed:\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}")
        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        run = client.search_runs([client.get_experiment_by_name("medical_ct").experiment_id])[0]
        metrics = run.data.metrics
        epochs = len(client.get_metric_history(run.info.run_id, "val_loss"))
        data_dir = project / "data/05_model_input"
        bare = [bare_training_loop(data_dir, params, epochs) for _ in range(2)]
        bare_seconds = statistics.mean(bare)
        node_seconds = {
            key.removeprefix("node_seconds."): value
            for key, value in metrics.items()
            if key.startswith("node_seconds.")
        }
        train_seconds = node_seconds["train_model"]

        print(f"\nfull kedro run (download..registration): {pipeline_seconds:7.1f} s")
        for name, seconds in sorted(node_seconds.items(), key=lambda item: -item[1]):
            print(f"  {name:24s} {seconds:7.1f} s")
        print(f"bare PyTorch loop, {epochs} epochs:  {', '.join(f'{s:.1f}' for s in bare)} s")
        print(
            f"\ntest accuracy {metrics['test_accuracy']:.4%} "
            f"({int(metrics['test_errors'])} errors), {int(metrics['data.train_images'])} "
            f"train / {int(metrics['data.test_images'])} test images, {epochs} epochs"
        )
        print(f"train_model node / bare loop:  {train_seconds / bare_seconds:.3f}")
        print(f"full kedro run / bare loop:    {pipeline_seconds / bare_seconds:.3f}")
    finally:
        server.shutdown()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"project kept in {project}")


if __name__ == "__main__":
    main()
