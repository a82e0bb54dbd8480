"""What the reviewed feedback already stored costs a data_processing rerun and the service.

    .venv/bin/python benchmarks/bench_feedback.py [--records 10000] [--repeats 5]
        [--against REF]

Years of review leave tens of thousands of records (one JSON file each) beside their images.
This makes a project with the 240-image sample in the raw store and N feedback items (small
distinct PNGs), each pending and accepted with its records, as the review leaves them; runs
`kedro run --pipelines data_processing` once; then reruns it with nothing new ``--repeats``
times, and prints the median wall time and its range, the peak RSS, and the seconds of the
steps that read the records (NodeTimingHook's metrics). Then what the service's review does
on every request, in process on the same project: ``ReviewStore.records()`` (each record
store listed; each worker's listing) and ``images([one])`` (every image the review page
shows, every accept) and what waits (counted after every /feedback and /review), median
seconds a call, and the memory the records read hold (tracemalloc, in a process of its
own). ``--against REF`` makes a second project from a checkout of REF (a git worktree in a
temporary folder; its own conf and code, the same data), alternates the runs of the two and
prints the ratios.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_incremental import CLASSES, synthetic_png
from project import PROJECT_ROOT, checkouts, make_project, run_kedro, step_seconds, uptime

SAMPLE = (PROJECT_ROOT / "../shared/data/mednist/sample").resolve()
STEPS = (
    "node_seconds.decode_feedback_images",
    "node_seconds.build_training_manifest",
    "node_seconds.report_feedback",
    "load_seconds.accepted_feedback_records",
    "load_seconds.previous_accepted_records",
    "save_seconds.accepted_records",
)


def reviewed_item(number: int) -> tuple[str, str, dict, dict]:
    """Item ``number`` as the review leaves an accepted one: its id, its image's path in the
    pending and accepted image stores, and its pending and accepted records."""
    label, name = CLASSES[number % len(CLASSES)], f"{number:08d}.png"
    feedback_id, image = f"{label}-{number:032x}", f"{label}/{name}"
    pending = {
        "feedback_id": feedback_id,
        "image": image,
        "sha256": f"{number:064x}",
        "label": label,
        "submitted_at": "2026-12-04T00:00:00+00:00",
        "submitter": "10.0.0.1",
    }
    accepted = {
        **pending,
        "submitted_label": label,
        "accepted_as": image,
        "decision": "accept",
        "reviewer": "alice",
        "decided_at": "2026-12-04T00:00:00+00:00",
    }
    return feedback_id, image, pending, accepted


def reviewed_feedback(data: Path, count: int) -> None:
    """``count`` items under ``data``/01_raw, each as the review leaves an accepted one: its
    image and record in the pending stores, and in the accepted ones."""
    for number in range(count):
        feedback_id, name, pending, accepted = reviewed_item(number)
        for store, record in (("feedback_pending", pending), ("feedback_accepted", accepted)):
            image = data / "01_raw" / store / "images" / name
            image.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(synthetic_png(10**7 + number))
            records = data / "01_raw" / store / "records"
            records.mkdir(parents=True, exist_ok=True)
            (records / f"{feedback_id}.json").write_text(json.dumps(record))


# Run with a tree's code in its project: the review's per-request reads, median of ``repeats``
REVIEW_CALLS = """
import json, statistics, sys, time, tracemalloc
from pathlib import Path
from medical_ct.serving.project import load_project
from medical_ct.serving.review import ReviewStore

store = ReviewStore(load_project(Path(sys.argv[1])).catalog)
if sys.argv[3] == "memory":  # traced apart: tracing slows what is timed
    tracemalloc.start()
    store.records()
    held = tracemalloc.get_traced_memory()[0] / 1e6
    print(json.dumps({"MB a worker holds after its first look": held}))
    sys.exit()
started = time.perf_counter()
pending = store.records().pending
first = time.perf_counter() - started
one = sorted(pending)[len(pending) // 2]
seconds = {"records(), first (reads every record)": first}
# What waits, counted after each /feedback and /review (before ReviewStore.waiting: anew)
waiting = getattr(store, "waiting", lambda: store.known().waiting())
calls = (
    ("records()", store.records),
    ("images([one])", lambda: store.images([one])),
    ("what waits, after a request", waiting),
)
for name, call in calls:
    times = []
    for _ in range(int(sys.argv[2])):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    seconds[f"{name}, median a call"] = statistics.median(times)
print(json.dumps(seconds))
"""


def review_calls(
    project: Path, env: dict[str, str], repeats: int, mode: str = "time"
) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", REVIEW_CALLS, str(project), str(repeats), mode],
        cwd=project, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode:
        sys.exit(f"the review's calls failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def project_for(tree: Path, folder: Path, records: int) -> tuple[Path, dict[str, str]]:
    """A project with ``tree``'s conf, the sample and ``records`` reviewed items, and the
    environment that runs ``tree``'s code in it."""
    project = make_project(folder, tree)
    shutil.copytree(SAMPLE, project / "data/01_raw/mednist")
    reviewed_feedback(project / "data", records)
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
    with (
        tempfile.TemporaryDirectory(prefix="bench-feedback-") as scratch,
        checkouts(args.against) as trees,
    ):
        projects = {
            name: project_for(tree, Path(scratch) / f"project-{number}", args.records)
            for number, (name, tree) in enumerate(trees.items())
        }
        for name, (project, env) in projects.items():
            seconds, _ = run_kedro(project, env, "--pipelines", "data_processing")
            print(f"{name}: full run {seconds:.1f} s ({args.records} accepted records)")
        print(f"load before: {uptime()}")
        reruns = {name: [] for name in projects}
        for _ in range(args.repeats):
            for name, (project, env) in projects.items():  # alternately: the same load
                reruns[name].append(run_kedro(project, env, "--pipelines", "data_processing"))
        service = {name: [] for name in projects}
        for _ in range(3):
            for name, (project, env) in projects.items():
                service[name].append(review_calls(project, env, args.repeats))
        for name, (project, env) in projects.items():
            held = review_calls(project, env, args.repeats, "memory")
            service[name] = [run | held for run in service[name]]
        print(f"load after:  {uptime()}")
        steps = {
            name: step_seconds(env["MLFLOW_TRACKING_URI"])[1:]
            for name, (_, env) in projects.items()
        }
    report(reruns, steps, service)


def report(
    reruns: dict[str, list], steps: dict[str, list[dict]], service: dict[str, list[dict]]
) -> None:
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
    print("\nthe review, in process (median of 3 processes)")
    for call in service[names[0]][0]:
        values = [statistics.median(run[call] for run in service[name]) for name in names]
        row(call, values, "MB" if call.startswith("MB") else "s")
        if len(names) == 2:
            print(f"{'':40s}{'this tree / ' + names[1]:>20} = {values[0] / values[1]:.3f}")
    if len(names) == 2:
        this, other = (statistics.median(walls[name]) for name in names)
        print(f"\nrerun wall: this tree / {names[1]} = {this / other:.2f}")


if __name__ == "__main__":
    main()
