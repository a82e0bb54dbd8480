"""What a data_processing rerun costs for the reviewed feedback it already has.

    .venv/bin/python benchmarks/bench_feedback.py [--records 10000] [--repeats 5]
        [--against REF]

Years of review leave tens of thousands of accepted records (one JSON file each) beside
their images. This makes a project with the 240-image sample in the raw store and N accepted
feedback images (small distinct PNGs) with their records, as the review writes them; runs
`kedro run --pipeline data_processing` once; then reruns it with nothing new ``--repeats``
times, and prints the median wall time and its range, the peak RSS, and the seconds of the
steps that read the records (NodeTimingHook's metrics). ``--against REF`` makes a second
project from a checkout of REF (a git worktree in a temporary folder; its own conf and code,
the same data), alternates the reruns of the two and prints the ratios.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench_incremental import CLASSES, synthetic_png
from project import PROJECT_ROOT, make_project, run_kedro, step_seconds, uptime

SAMPLE = (PROJECT_ROOT / "../shared/data/mednist/sample").resolve()
STEPS = (
    "node_seconds.decode_feedback_images",
    "node_seconds.build_training_manifest",
    "node_seconds.report_feedback",
    "load_seconds.accepted_feedback_records",
    "load_seconds.previous_accepted_records",
    "save_seconds.accepted_records",
)


def accepted_feedback(data: Path, count: int) -> None:
    """``count`` accepted images and their records under ``data`` (01_raw/feedback_accepted)."""
    for number in range(count):
        label, name = CLASSES[number % len(CLASSES)], f"{number:08d}.png"
        image = data / "01_raw/feedback_accepted/images" / label / name
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(synthetic_png(10**7 + number))
        feedback_id = f"{label}-{number:032x}"
        record = {
            "feedback_id": feedback_id,
            "image": f"{label}/{name}",
            "label": label,
            "submitted_label": label,
            "submitted_at": "2026-12-04T00:00:00+00:00",
            "submitter": "10.0.0.1",
            "accepted_as": f"{label}/{name}",
            "decision": "accept",
            "reviewer": "alice",
            "decided_at": "2026-12-04T00:00:00+00:00",
        }
        records = data / "01_raw/feedback_accepted/records"
        records.mkdir(parents=True, exist_ok=True)
        (records / f"{feedback_id}.json").write_text(json.dumps(record))


def project_for(tree: Path, folder: Path, records: int) -> tuple[Path, dict[str, str]]:
    """A project with ``tree``'s conf, the sample and ``records`` accepted items, and the
    environment that runs ``tree``'s code in it."""
    project = make_project(folder, tree)
    shutil.copytree(SAMPLE, project / "data/01_raw/mednist")
    accepted_feedback(project / "data", records)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
        "KEDRO_DISABLE_TELEMETRY": "1",
        "PYTHONPATH": str(tree / "src"),
    }
    env.pop("KEDRO_ENV", None)
    return project, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--against", help="a git ref to rerun the same data on")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-feedback-") as scratch:
        trees = {"this tree": PROJECT_ROOT}
        if args.against:
            worktree = Path(scratch) / "against"
            subprocess.run(
                ["git", "-C", str(PROJECT_ROOT), "worktree", "add", "--detach", "-f",
                 str(worktree), args.against], check=True, capture_output=True,
            )  # fmt: skip
            trees[args.against] = worktree
        try:
            projects = {
                name: project_for(tree, Path(scratch) / f"project-{number}", args.records)
                for number, (name, tree) in enumerate(trees.items())
            }
            for name, (project, env) in projects.items():
                seconds, _ = run_kedro(project, env, "--pipeline", "data_processing")
                print(f"{name}: full run {seconds:.1f} s ({args.records} accepted records)")
            print(f"load before: {uptime()}")
            reruns = {name: [] for name in projects}
            for _ in range(args.repeats):
                for name, (project, env) in projects.items():  # alternately: the same load
                    reruns[name].append(run_kedro(project, env, "--pipeline", "data_processing"))
            print(f"load after:  {uptime()}")
            steps = {
                name: step_seconds(env["MLFLOW_TRACKING_URI"])[1:]
                for name, (_, env) in projects.items()
            }
        finally:
            if args.against:
                subprocess.run(
                    ["git", "-C", str(PROJECT_ROOT), "worktree", "remove", "--force",
                     str(worktree)], check=False, capture_output=True,
                )  # fmt: skip
    report(reruns, steps)


def report(reruns: dict[str, list], steps: dict[str, list[dict]]) -> None:
    names = list(reruns)
    print("\nrerun with nothing new" + "".join(f"{name:>22}" for name in names))

    def row(label: str, values: list[float], unit: str = "s") -> None:
        print(f"{label:40s}" + "".join(f"{value:>20.3f} {unit}" for value in values))

    walls = {name: [seconds for seconds, _ in runs] for name, runs in reruns.items()}
    row("wall, median", [statistics.median(walls[name]) for name in names])
    print(
        f"{'wall, range':40s}"
        + "".join(f"{f'{min(walls[n]):.2f}-{max(walls[n]):.2f}':>20} s" for n in names)
    )
    row("peak RSS, largest", [max(mib for _, mib in reruns[name]) for name in names], "MiB")
    for step in STEPS:
        values = [[run[step] for run in steps[name] if step in run] for name in names]
        print(
            f"{step:40s}"
            + "".join(f"{statistics.median(v):>20.3f} s" if v else f"{'-':>20}  " for v in values)
        )
    if len(names) == 2:
        this, other = (statistics.median(walls[name]) for name in names)
        print(f"\nwall: this tree / {names[1]} = {this / other:.2f}")


if __name__ == "__main__":
    main()
