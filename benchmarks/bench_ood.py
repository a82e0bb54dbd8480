"""What /predict's out-of-distribution check costs: the served model's answers with and
without it, side by side in one run.

    .venv/bin/python benchmarks/bench_ood.py [--project P] [--rounds 5]

``--project``: a project whose MLflow store (``mlflow.db``) has a champion and whose raw store
holds images (e.g. one ``make run`` made); without it, a champion is trained on the 240-image
sample in a temporary project, as ``bench_service.py`` does. For batches of 1, 8 and 32 of
the project's own images: milliseconds a batch of ``ServedModel.classify`` without the check
(``predict_probabilities``) and with it (one forward pass for the answer and the features,
then the distance), interleaved round by round, each keeping its best; and the seconds the
reference takes to build when a version is loaded.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import train_project
from project import uptime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        project = args.project or train_project(Path(scratch) / "project")
        measure(project.resolve(), args.rounds)


def measure(project: Path, rounds: int) -> None:
    uri = f"sqlite:///{project / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_REGISTRY_URI"] = uri
    os.chdir(project)
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from medical_ct.preprocessing import preprocess_image
    from medical_ct.serving.model_holder import load_served_model
    from medical_ct.serving.ood import check_builder

    bootstrap_project(project)
    with KedroSession.create(project_path=project) as session:
        catalog = session.load_context().catalog
    plain = load_served_model()
    if plain is None:
        sys.exit(f"no champion in {uri}: run `kedro run` there first")
    started = time.perf_counter()
    check = check_builder(catalog, 50, 1.5)(plain.classifier.model)
    built_s = time.perf_counter() - started
    checked = type(plain)(plain.classifier, plain.test_metrics, check)
    files = catalog.load("raw_images")
    images = np.stack([preprocess_image(files[key]()) for key in sorted(files)[:32]])
    print(f"load: {uptime()}")
    print(f"reference built in {built_s:.1f} s (50 images a class, from {len(files)} raw images)")
    print("batch  without check (ms)  with check (ms)  ratio")
    for size in (1, 8, 32):
        best = {"without": float("inf"), "with": float("inf")}
        for _ in range(rounds):
            for name, served in (("without", plain), ("with", checked)):
                begun = time.perf_counter()
                served.classify(images[:size])
                best[name] = min(best[name], (time.perf_counter() - begun) * 1000)
        ratio = best["with"] / best["without"]
        print(f"{size:5d}  {best['without']:19.1f}  {best['with']:15.1f}  {ratio:5.2f}")


if __name__ == "__main__":
    main()
