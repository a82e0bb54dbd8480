"""The monitoring pipeline over a large prediction log: time and peak memory.

    .venv/bin/python benchmarks/bench_monitoring.py [--records 100000] [--new-fraction 0.01]

1. A fresh temporary project trains a champion on the 240-image sample (the tests' fast
   settings; not timed).
2. N synthetic prediction log records are written with the service's own writer
   (``PredictionLog``) to the project's local log: sample images with a little noise each
   (so no two are the same), the champion's classes and random confidences, one file per
   100 records (a busy worker's flush) spread over N / 1,000 hours.
3. `kedro run --pipelines monitoring` reads them all (the first run): wall time and peak RSS
   of the kedro process, and the machine's load (`uptime`) before it.
4. N x new-fraction more records are written and the pipeline runs again: only the new
   files are read, so its time should follow the new records, not all records ever logged.
"""

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from project import PROJECT_ROOT, make_project, run_kedro, step_seconds, uptime

sys.path.insert(0, str(PROJECT_ROOT / "src"))
from medical_ct.datasets import PredictionLogDataset
from medical_ct.preprocessing import preprocess_image
from medical_ct.serving.prediction_log import PredictionLog, new_prediction_id

SAMPLE = (PROJECT_ROOT / "../shared/data/mednist/sample").resolve()
CLASSES = ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"]
FAST = (
    "training.max_epochs=6,training.batch_size=16,training.learning_rate=0.005,"
    "training.patience=6,champion_gate.min_accuracy=0.7,"
    "champion_gate.min_class_recall=0.5,champion_gate.max_ece=0.5,min_new_images=1"
)
RECORDS_PER_FILE = 100
START_MS = 1_780_000_000_000


def node_seconds(tracking_uri: str) -> dict[str, float]:
    """Node and dataset-load seconds over 0.5 s of the latest run."""
    latest = step_seconds(tracking_uri)[-1]
    return {
        name: value
        for name, value in latest.items()
        if name.startswith(("node_seconds.", "load_seconds.")) and value >= 0.5
    }


def sample_images() -> np.ndarray:
    return np.stack([preprocess_image(path.read_bytes()) for path in sorted(SAMPLE.glob("*/*"))])


def write_records(log_path: Path, count: int, first: int, images: np.ndarray) -> float:
    """Write records ``first .. first + count`` with the service's writer; return seconds."""
    started = time.perf_counter()
    rng = np.random.default_rng(first)
    log = PredictionLog(PredictionLogDataset(path=str(log_path)), 3600, log_pixels=True)
    for number in range(first, first + count):
        noise = rng.integers(-3, 4, images.shape[1:])
        image = np.clip(images[number % len(images)] + noise, 0, 255).astype(np.uint8)
        label = CLASSES[number % len(CLASSES)]
        confidence = float(rng.uniform(0.6, 1.0))
        rest = (1 - confidence) / (len(CLASSES) - 1)
        result = {
            "label": label,
            "confidence": confidence,
            "probabilities": {c: confidence if c == label else rest for c in CLASSES},
            "model_version": "1",
            "needs_review": False,
            "out_of_distribution": False,
            "out_of_distribution_ratio": 0.5,
        }
        log.append(new_prediction_id(START_MS + number * 3600), result, image)  # 1,000 an hour
        if (number + 1) % RECORDS_PER_FILE == 0:
            log.flush()
    log.close()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--new-fraction", type=float, default=0.01)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-monitoring-") as folder:
        project = make_project(Path(folder) / "project")
        (project / "data/01_raw").mkdir(parents=True)
        os.symlink(SAMPLE, project / "data/01_raw/mednist")
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
            "KEDRO_DISABLE_TELEMETRY": "1",
            "PYTHONPATH": str(PROJECT_ROOT / "src"),
        }
        env.pop("MLFLOW_REGISTRY_URI", None)
        print("training a champion on the sample (not timed)...", flush=True)
        run_kedro(project, env, "--params", FAST)
        images = sample_images()
        log_path = project / "data/01_raw/prediction_log"
        seconds = write_records(log_path, args.records, 0, images)
        files = sum(1 for _ in log_path.rglob("*.parquet"))
        print(f"wrote {args.records:,} records in {files:,} files in {seconds:.1f} s")
        print(f"load before first run: {uptime()}")
        first_s, first_rss = run_kedro(project, env, "--pipelines", "monitoring")
        print(f"first run, steps over 0.5 s: {node_seconds(env['MLFLOW_TRACKING_URI'])}")
        new = max(1, int(args.records * args.new_fraction))
        write_records(log_path, new, args.records, images)
        print(f"load before rerun:     {uptime()}")
        rerun_s, rerun_rss = run_kedro(project, env, "--pipelines", "monitoring")
        print(f"rerun, steps over 0.5 s:     {node_seconds(env['MLFLOW_TRACKING_URI'])}")
        print(f"{'run':<28}{'records':>10}{'seconds':>10}{'peak MiB':>10}")
        print(f"{'first (all records)':<28}{args.records:>10,}{first_s:>10.1f}{first_rss:>10.0f}")
        print(f"{'rerun (new records only)':<28}{new:>10,}{rerun_s:>10.1f}{rerun_rss:>10.0f}")
        print(f"load after:            {uptime()}")
        own_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"this process (the writer) peak RSS: {own_rss:.0f} MiB")


if __name__ == "__main__":
    main()
