"""What the review's requests cost on S3 after years of feedback: a decision and a submission.

    .venv/bin/python benchmarks/bench_review_s3.py [--items 3000] [--latency-ms 20]
        [--calls 5] [--rounds 3] [--against REF]

Starts moto's S3 server in its own process, adding ``--latency-ms`` to each request (S3's
time to first byte is tens of milliseconds; moto on loopback answers in about one), and
stores N items in a project's ``s3`` environment, each pending and accepted, as the review
leaves them, plus the items the rounds decide. Then, in a fresh process per round with a
tree's code (``--against REF``: a checkout of REF, in a git worktree, on its own copy of the
same items; the trees alternate), the service's review on those stores: the first look
(every record read), then ``--calls`` submissions of new images (``POST /feedback``) and
decisions (``POST /review``), a look (``GET /review``, and each worker's every
``look_every_s``: the journals' last minutes, where a tree before ``ReviewStore.look`` listed
the three record stores), and a listing of them (each worker's every ``list_every_s``).
Prints the median seconds a call and the ratios. moto is Python on
these 2 cores: a page of 1,000 keys costs it far more CPU than S3 takes to answer, so the
listings' share is larger here than on S3, and the latency is the part that is like S3's.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import fsspec
from bench_feedback import reviewed_item
from bench_incremental import synthetic_png
from bench_records_s3 import CREDENTIALS, start_server
from project import PROJECT_ROOT, checkouts, make_project, uptime

BUCKET = "bench-review"

# Run with a tree's code in its project: the review's requests, median seconds a call
REVIEW_REQUESTS = """
import json, statistics, sys, time
from pathlib import Path
from medical_ct.serving.project import load_project
from medical_ct.serving.review import ReviewQueue
from bench_incremental import synthetic_png

project = load_project(Path(sys.argv[1]), env="s3")
reviews = ReviewQueue(project.catalog, project.review)
to_decide, first_image = json.loads(sys.argv[2]), int(sys.argv[3])

def timed(call, arguments):
    times = []
    for argument in arguments:
        started = time.perf_counter()
        call(argument)
        times.append(time.perf_counter() - started)
    return statistics.median(times) if len(times) > 1 else times[0]

store = reviews.store
look = getattr(store, "look", lambda listing=False: store.records())  # before it: each listed
seconds = {"first look (every record read)": timed(lambda _: look(True), [0])}
submit = lambda n: reviews.submit(synthetic_png(n), None, "Hand", {"submitter": f"s{n}"}, None)
numbers = range(first_image, first_image + len(to_decide))
seconds["POST /feedback (a new image)"] = timed(submit, numbers)
seconds["POST /review (accept)"] = timed(lambda i: reviews.decide(i, "accept", "alice"), to_decide)
seconds["a look (GET /review)"] = timed(lambda _: look(), range(3))
seconds["a listing (every list_every_s)"] = timed(lambda _: look(True), range(3))
print(json.dumps(seconds))
"""


def store_items(filesystem, root: str, items: int, to_decide: int) -> list[str]:
    """``items`` items each pending and accepted under ``root`` (records only: nothing here
    reads their images), and ``to_decide`` pending ones with their images; returns the ids to
    decide."""
    files, undecided = {}, []
    for number in range(items + to_decide):
        feedback_id, image, pending, accepted = reviewed_item(number)
        files[f"{root}/feedback_pending/records/{feedback_id}.json"] = json.dumps(pending).encode()
        if number < items:
            path = f"{root}/feedback_accepted/records/{feedback_id}.json"
            files[path] = json.dumps(accepted).encode()
        else:
            files[f"{root}/feedback_pending/images/{image}"] = synthetic_png(10**8 + number)
            undecided.append(feedback_id)
    filesystem.pipe(files)  # gathered PUTs
    return undecided


def requests(project: Path, env: dict[str, str], ids: list[str], first: int) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", REVIEW_REQUESTS, str(project), json.dumps(ids), str(first)],
        cwd=project, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode:
        sys.exit(f"the review's requests failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--latency-ms", type=float, default=20)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--against", help="a git ref to run the same requests on")
    args = parser.parse_args()
    os.environ.update({**CREDENTIALS, "AWS_DEFAULT_REGION": "us-east-1"})
    server, endpoint = start_server(args.latency_ms)
    filesystem = fsspec.filesystem("s3", endpoint_url=endpoint)
    filesystem.mkdir(BUCKET)
    with (
        tempfile.TemporaryDirectory(prefix="bench-review-") as scratch,
        checkouts(args.against) as trees,
    ):
        try:
            runs = {}
            for number, (name, tree) in enumerate(trees.items()):
                project = make_project(Path(scratch) / f"project-{number}", tree)
                env = {
                    **os.environ,
                    "AWS_ENDPOINT_URL": endpoint,
                    "MEDICAL_CT_S3_BUCKET": BUCKET,
                    "MEDICAL_CT_S3_PREFIX": f"tree{number}",
                    "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
                    "KEDRO_DISABLE_TELEMETRY": "1",
                    "PYTHONPATH": f"{tree / 'src'}:{PROJECT_ROOT / 'benchmarks'}",
                }
                root = f"{BUCKET}/tree{number}/01_raw"
                ids = store_items(filesystem, root, args.items, args.calls * args.rounds)
                runs[name] = (project, env, ids, [])
            print(f"{args.items} items pending and accepted, {args.latency_ms:.0f} ms added to")
            print(f"each request, {args.rounds} rounds of {args.calls} calls; {uptime()}")
            for round_ in range(args.rounds):
                for project, env, ids, results in runs.values():  # alternately: the same load
                    chosen = ids[round_ * args.calls : (round_ + 1) * args.calls]
                    results.append(requests(project, env, chosen, 10**9 + round_ * 100))
            print(f"load after: {uptime()}")
        finally:
            server.terminate()
    report({name: results for name, (*_, results) in runs.items()})


def report(results: dict[str, list[dict[str, float]]]) -> None:
    names = list(results)
    print(f"\n{'median seconds a call':40s}" + "".join(f"{name:>14}" for name in names))
    for call in results[names[0]][0]:
        values = [statistics.median(run[call] for run in results[name]) for name in names]
        ratio = f"{values[0] / values[1]:>10.3f}" if len(values) == 2 else ""
        print(f"{call:40s}" + "".join(f"{value:>14.3f}" for value in values) + ratio)


if __name__ == "__main__":
    main()
