"""Full `kedro run` on the MedNIST dev set: training variants side by side, test errors per seed.

    .venv/bin/python benchmarks/bench_pipeline.py [--archive PATH] [--seeds 42,1,2]
        [--variants default,stem-conv] [--bare] [--keep]

1. Serves the tarball from a local HTTP server and runs the whole default pipeline in a fresh
   temporary project (download, md5, extract into the raw store, processing, training,
   evaluation, registration) with the project's default parameters: the end-to-end time.
2. For each variant (``VARIANTS``: the default, the conv stem, pooling, widths, augmentation,
   more epochs; by default the default and the conv stem, accuracy against time) and each
   seed, the whole default `kedro run` again on that project with
   ``retrain_on_same_data=true`` and the variant's training parameters (data processing
   reuses the decoded pixels; the default's first seed is the fresh run of step 1). Variants
   are interleaved seed by seed, so a burst of other work on the machine slows every
   variant, not one.
3. Prints, for every run: test errors, wall time, the train_model node's time and its mean
   epoch time, and the load average (`uptime`) before and after; then per variant the mean
   errors over the seeds and the train_model time relative to the default's in the same
   benchmark (the machine may be shared: compare ratios, and scale a quiet figure).
4. With ``--bare``: the default model, optimiser and schedule in a bare PyTorch loop on the
   same tensors, against `kedro run --pipelines training` (the overhead of Kedro and MLflow).
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

from medical_ct.augmentation import augment_batch
from medical_ct.model import build_classifier
from medical_ct.pipelines.training.nodes import TrainingParams
from medical_ct.shards import ModelInputDataset

DEV_ARCHIVE = PROJECT_ROOT / "../shared/data/mednist/MedNIST-dev.tar.gz"


def _augmented(**values: object) -> dict[str, object]:
    """Augmentation on, with ``values`` for its parameters (the rest from conf/base)."""
    prefix = "training.augmentation."
    return {f"{prefix}enabled": "true", **{prefix + key: value for key, value in values.items()}}


def _framing(share: float) -> dict[str, object]:
    """Framing alone on ``share`` of the images: a picture of 0.4-0.85 of the side on a grey."""
    return _augmented(
        max_rotation_degrees=0,
        max_shift_pixels=0,
        max_zoom=0,
        frame_probability=1,
        frame_size=0.4,
        probability=share,
    )


# Training parameters of each variant on top of conf/base (kedro --params keys and values).
# The error counts in the comments were measured on top of the default of their day: global
# average pooling until 2026-12-02, avg_max since; the conv stem until 2026-12-02 09:36,
# conv_pool since (the variants now run with both). width-24 was measured with the conv stem
# (1.91x, 3/1/3 errors) and, in a run named stem-pool-width-24, with conv_pool (2/2/1, 1.96x).
VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    # Geometry only, mild, 5 epochs: 3 errors on seed 42 (README).
    "augment-geometry": {
        "training.max_epochs": 5,
        **_augmented(
            max_rotation_degrees=8,
            max_shift_pixels=3,
            max_zoom=0.1,
            max_gain=0,
            max_gamma=0,
            invert_probability=0,
            probability=0.5,
        ),
    },
    # Geometry and intensity (gain, gamma, 1 in 10 inverted), 5 epochs: 7 errors on seed 42.
    "augment-full": {
        "training.max_epochs": 5,
        **_augmented(
            max_rotation_degrees=10,
            max_shift_pixels=4,
            max_zoom=0.15,
            max_gain=0.2,
            max_gamma=0.3,
            invert_probability=0.1,
            probability=0.8,
        ),
    },
    # Framing only, 4 epochs like the default: a quarter of the images as a smaller picture on a
    # plain grey, as the hands the default calls CXR are (README: the error study).
    "augment-frame": _framing(share=0.25),
    # One image in ten framed: a quarter fixed the framed hands and cost other X-rays.
    "augment-frame-10": _framing(share=0.1),
    # One more epoch, no augmentation: what the fifth epoch alone buys.
    "5-epochs": {"training.max_epochs": 5, "training.augmentation.enabled": "false"},
    # A wider small CNN (24 channels in the first block, 16 by default): about 2.25x the
    # convolutions' work, for the errors a wider model may not make.
    "width-24": {"training.width": 24},
    # Narrower, for issue 12's 150 s: a training step of width 8 takes 0.38x width 16's on
    # this CPU (62 against 165 ms a batch of 128, channels_last), width 12 0.75x. With the
    # conv stem: 2/4/4 and 2/3/3 errors (the conv_pool stem made the time at 1/1/1).
    "width-8": {"training.width": 8},
    "width-12-3-epochs": {"training.width": 12, "training.max_epochs": 3},
    # The stem without its max pool, the default until 2026-12-02 09:36 (blocks 2-4 on 32, 16
    # and 8 pixels; 1/0/0 errors over seeds 42/1/2, train_model 3.2x conv_pool's 1/1/1).
    "stem-conv": {"training.stem": "conv"},
    # Global average pooling alone, the default before avg_max (3/2/2 errors over seeds
    # 42/1/2; avg_max, the default since: 1/0/0).
    "avg-pool": {"training.pooling": "avg"},
}


def overrides(variant: str) -> str:
    """The variant's parameters as one `kedro run --params` value."""
    return ",".join(f"{key}={value}" for key, value in VARIANTS[variant].items())


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def bare_training_loop(data_dir: Path, params: dict, epochs: int) -> float:
    """The same model, optimiser, schedule and augmentation as the training node, bare."""
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
    settings = TrainingParams.from_params(params)
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    model = build_classifier(
        settings.architecture, len(class_names), settings.width, settings.pooling, settings.stem
    )
    model = model.to(memory_format=torch.channels_last)
    images = torch.from_numpy(train["images"]).contiguous(memory_format=torch.channels_last)
    labels = torch.from_numpy(train["labels"])
    batch = settings.batch_size
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    generator = torch.Generator().manual_seed(settings.seed + 1)
    steps = settings.max_epochs * -(-len(labels) // batch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.learning_rate, total_steps=steps
    )
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(labels))
        for start in range(0, len(labels), batch):
            index = order[start : start + batch]
            batch_images = augment_batch(images[index], settings.augmentation, generator)
            batch_images = batch_images.contiguous(memory_format=torch.channels_last)
            loss = nn.functional.cross_entropy(model(batch_images), labels[index])
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


def load_average() -> float:
    """The 1-minute load average, as `uptime` prints it (printed too)."""
    print(subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip())
    return os.getloadavg()[0]


def run_figures(client: MlflowClient, run) -> dict[str, float]:
    """Test errors, train_model seconds and mean epoch seconds of one MLflow run."""
    metrics = run.data.metrics
    epochs = [m.value for m in client.get_metric_history(run.info.run_id, "epoch_seconds")]
    return {
        "errors": int(metrics["test_errors"]),
        "accuracy": metrics["test_accuracy"],
        "train_s": metrics["node_seconds.train_model"],
        "epochs": len(epochs),
        "epoch_s": statistics.mean(epochs) if epochs else float("nan"),
    }


def print_full_run(full_seconds: float, metrics: dict[str, float], epochs: int) -> None:
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


def print_variants(results: dict[str, list[dict]], full_seconds: float) -> None:
    width = max(14, *(len(name) for name in results))
    print(
        f"\n{'variant':{width}s} seed  errors  run s  train_model s  epochs  epoch s  "
        "load before/after"
    )
    for name, runs in results.items():
        for run in runs:
            print(
                f"{name:{width}s} {run['seed']:4d}  {run['errors']:6d}  {run['wall_s']:5.0f}  "
                f"{run['train_s']:13.1f}  {run['epochs']:6d}  {run['epoch_s']:7.1f}  "
                f"{run['load_before']:.2f} / {run['load_after']:.2f}"
            )
    reference = results.get("default")
    reference_train = statistics.mean(r["train_s"] for r in reference) if reference else None
    print(
        f"\n{'variant':{width}s} mean errors  per seed      mean train_model s  vs default  "
        "(VARIANTS: parameters)"
    )
    for name, runs in results.items():
        train = statistics.mean(r["train_s"] for r in runs)
        ratio = f"{train / reference_train:11.2f}" if reference_train else " " * 11
        print(
            f"{name:{width}s} {statistics.mean(r['errors'] for r in runs):11.2f}  "
            f"{'/'.join(str(r['errors']) for r in runs):12s}  {train:18.1f}  {ratio}  "
            f"({overrides(name) or 'conf/base'})"
        )
    print(
        f"(the default's seed {results[next(iter(results))][0]['seed']} is the fresh run: "
        f"{full_seconds:.0f} s end to end)"
        if "default" in results
        else ""
    )


def print_bare(bare: list[float], training_seconds: float, train_node_seconds: float) -> None:
    bare_seconds = statistics.mean(bare)
    print(f"\nbare PyTorch loop, same tensors:   {' / '.join(f'{s:.1f}' for s in bare)} s")
    print(
        f"kedro run --pipelines training:    {training_seconds:.1f} s "
        f"(train_model node {train_node_seconds:.1f} s)"
    )
    print(f"training pipeline / bare loop:     {training_seconds / bare_seconds:.3f}")
    print(f"train_model node / bare loop:      {train_node_seconds / bare_seconds:.3f}")


def run_variants(
    variants: list[str],
    seeds: list[int],
    first: dict,
    kedro_run,
    client: MlflowClient,
    experiment_id: str,
) -> dict[str, list[dict]]:
    """Every variant for every seed, interleaved seed by seed; ``first`` is the fresh run."""
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for seed in seeds:
        for name in variants:
            if name == "default" and seed == seeds[0]:
                figures = run_figures(client, first["run"])
                wall, (before, after) = first["wall_s"], first["loads"]
            else:
                params = ",".join(
                    part for part in (overrides(name), f"training.seed={seed}") if part
                )
                before = load_average()
                wall = kedro_run(f"retrain_on_same_data=true,{params}")
                after = load_average()
                latest = client.search_runs(
                    [experiment_id], order_by=["attributes.start_time DESC"]
                )[0]
                figures = run_figures(client, latest)
            run = {
                **figures,
                "seed": seed,
                "wall_s": wall,
                "load_before": before,
                "load_after": after,
            }
            results[name].append(run)
            print(f"{name} seed {seed}: {run['errors']} test errors, {wall:.0f} s", flush=True)
    return results


def run_bare(data_dir: Path, params: dict, epochs: int, kedro_run, client) -> None:
    """Side by side: bare loop, the training pipeline through Kedro, bare loop again."""
    bare = [bare_training_loop(data_dir, params, epochs)]
    training_seconds = kedro_run("--pipelines", "training", "--params", "retrain_on_same_data=true")
    bare.append(bare_training_loop(data_dir, params, epochs))
    experiment_id = client.get_experiment_by_name("medical_ct").experiment_id
    training_run = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"])[0]
    print_bare(bare, training_seconds, training_run.data.metrics["node_seconds.train_model"])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=DEV_ARCHIVE)
    parser.add_argument("--seeds", default="42,1,2", help="comma-separated training seeds")
    parser.add_argument(
        "--variants",
        default="default,stem-conv",
        help=f"comma-separated, of: {', '.join(VARIANTS)}",
    )
    parser.add_argument("--bare", action="store_true", help="also time a bare PyTorch loop")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project")
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}: choose from {', '.join(VARIANTS)}")
    return args


def main() -> None:
    args = parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    variants = args.variants.split(",")
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
    env["PYTHONPATH"] = str(PROJECT_ROOT / "src")  # this checkout's code
    kedro = str(Path(sys.executable).with_name("kedro"))
    config = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_training.yml").read_text())
    params = config["training"]
    print(
        f"archive {archive.name} (md5 {md5}), {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"seeds {seeds}, variants {variants}"
    )

    def kedro_run(*args: str) -> float:
        started = time.perf_counter()
        result = subprocess.run(
            [kedro, "run", *args], cwd=project, env=env, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            sys.exit(f"kedro run failed:\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}")
        return time.perf_counter() - started

    try:
        load_before = load_average()
        ingest = f"ingest.url={base_url}/{archive.name},ingest.md5={md5}"
        full_seconds = kedro_run("--params", f"{ingest},training.seed={seeds[0]}")
        load_after = load_average()
        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        experiment_id = client.get_experiment_by_name("medical_ct").experiment_id
        (full_run,) = client.search_runs([experiment_id])
        epochs = len(client.get_metric_history(full_run.info.run_id, "val_loss"))
        print_full_run(full_seconds, full_run.data.metrics, epochs)
        first = {"run": full_run, "wall_s": full_seconds, "loads": (load_before, load_after)}
        results = run_variants(
            variants,
            seeds,
            first,
            lambda overrides: kedro_run("--params", f"{ingest},{overrides}"),
            client,
            experiment_id,
        )
        print_variants(results, full_seconds)
        if args.bare:
            run_bare(project / "data/05_model_input", params, epochs, kedro_run, client)
        load_average()
    finally:
        server.shutdown()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"project kept in {project}")


if __name__ == "__main__":
    main()
