"""data_processing on the MedNIST dev set in a real S3 server: full run versus a rerun with 1% new.

    .venv/bin/python benchmarks/bench_incremental.py [--archive PATH] [--new-fraction 0.01]
        [--no-change-queue]

1. Starts moto's S3 server on a free loopback port and uploads 99% of the dev set's images to
   the bucket's raw prefix (parallel batched PUTs through s3fs; timed, not part of the figures).
2. `kedro run --env s3 --pipelines data_processing` in a fresh temporary project: every image
   is read from the bucket and decoded (the full run).
3. Uploads the remaining 1% and runs again: only the new objects are read and decoded, the
   rest comes from the last run's decoded set in the bucket (the incremental rerun). The
   rerun finds the new objects from the bucket's S3 events in an SQS queue on the same moto
   server (set up after the first upload with ``medical_ct.changes.create_event_queue``, as
   the README says), not by listing every key; ``--no-change-queue`` lists every key.
4. Prints both wall times, the ratio (target: rerun <= 10% of the full run) and the counts of
   the data report, with the machine's load (`uptime`) before each run.

    .venv/bin/python benchmarks/bench_incremental.py --scale 100000,500000 [--skip-s3] [--repeats 3]

adds a synthetic scale run on the local disk (no upload to moto): for each size N, N small
distinct PNG images (16x16, grayscale) are written under a fresh project's raw store, in
batch folders of 1% each (``<Class>/batch-NNNN/``, as a hospital's exports arrive), a full
`kedro run --pipelines data_processing` decodes them, 1% more are added in a new batch folder
and the rerun is timed both ways of listing the local store, alternately: asking every file
its size and time ("every file", the default) and listing only the folders whose time moved
("folder times", ``raw_folder_times``). Each is the median of ``--repeats`` reruns from the
same state (the last one's steps are printed), then one more rerun with nothing new
("none"): what a rerun costs for the images already decoded, which is what grows with N.
"ms/new" is what each new image adds (rerun minus none, over the new images). Each run's peak
RSS is that of its own `kedro` process (the reruns': the largest). The full run's time and
memory grow with N.
"""

import argparse
import io
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import s3fs
from moto.server import ThreadedMotoServer
from project import PROJECT_ROOT, make_project, run_kedro, step_seconds, uptime

sys.path.insert(0, str(PROJECT_ROOT / "src"))
from PIL import Image

from medical_ct.changes import create_event_queue
from medical_ct.mednist import read_images

DEV_ARCHIVE = PROJECT_ROOT / "../shared/data/mednist/MedNIST-dev.tar.gz"
BUCKET = "medical-ct-bench"
PREFIX = "bench"
CLASSES = ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"]


def synthetic_png(number: int) -> bytes:
    """A 16x16 grayscale PNG no other number gives: the number's bytes are its first pixels."""
    pixels = bytearray((number * 7 + i * 13) % 256 for i in range(256))
    pixels[:8] = number.to_bytes(8, "little")
    buffer = io.BytesIO()
    Image.frombytes("L", (16, 16), bytes(pixels)).save(buffer, "PNG")
    return buffer.getvalue()


def first_and_last_steps(tracking_uri: str) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per node, dataset load and save in the first and the last run."""
    runs = step_seconds(tracking_uri)
    return runs[0], runs[-1]


def print_node_seconds(columns: dict[str, tuple[dict[str, float], float]]) -> None:
    """Seconds per step of each run, ``{column: (steps, wall seconds)}``, the first's order."""
    (first, _), *_ = columns.values()
    print(f"{'where the time went (NodeTimingHook)':48}" + "".join(f"{c:>14}" for c in columns))
    for key in sorted(first, key=first.get, reverse=True):
        if max(steps.get(key, 0) for steps, _ in columns.values()) >= 0.1:
            cells = (steps.get(key, float("nan")) for steps, _ in columns.values())
            print(f"{key:48}" + "".join(f"{cell:14.1f}" for cell in cells))
    rest = (seconds - sum(steps.values()) for steps, seconds in columns.values())
    print(f"{'the rest (start-up, hooks, MLflow run)':48}" + "".join(f"{r:14.1f}" for r in rest))


def write_synthetic(raw: Path, numbers: range, batch: int) -> None:
    """Images ``numbers`` as ``<Class>/batch-NNNN/<number>.png``, ``batch`` numbers a folder."""
    for number in numbers:
        folder = raw / CLASSES[number % len(CLASSES)] / f"batch-{number // batch:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{number:08d}.png").write_bytes(synthetic_png(number))


LISTINGS = {"every file": "false", "folder times": "true"}  # raw_folder_times


def use_listing(project: Path, listing: str) -> None:
    (project / "conf/local/globals.yml").write_text(f"raw_folder_times: {LISTINGS[listing]}\n")


def data_report(project: Path) -> dict:
    return json.loads((project / "data/08_reporting/data_report.json").read_text())


def scale_run(sizes: list[int], new_fraction: float, repeats: int) -> None:
    """Full run, then 1% reruns of data_processing on N synthetic images on the local disk.

    The reruns run ``repeats`` times each way of listing, alternately, from the same state (the
    decoded sets' indexes and the saved listing as the full run left them: shards are named by
    their content, so each rerun writes the same ones again). Medians are printed with their
    range: one rerun's time varied by a quarter from run to run on this machine.
    """
    print(f"\nsynthetic scale run on the local disk, {new_fraction:.0%} new in the rerun")
    print(
        f"{'images':>10}  {'listing':<14}{'full s':>8}{'full MiB':>10}{'rerun s':>9}"
        f"{'range s':>11}{'rerun MiB':>11}{'ratio':>7}{'none s':>8}{'none MiB':>10}"
        f"{'ms/new':>8}  load before the reruns"
    )
    timings = {}
    for size in sizes:
        workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
        try:
            project = make_project(workdir / "project")
            raw = project / "data/01_raw/mednist"
            new = round(size * new_fraction)
            write_synthetic(raw, range(size - new), batch=new)
            env = {
                **os.environ,
                "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
                "KEDRO_DISABLE_TELEMETRY": "1",
                "PYTHONPATH": str(PROJECT_ROOT / "src"),
            }
            env.pop("KEDRO_ENV", None)
            use_listing(project, "folder times")  # which also saves the listing for its reruns
            full_seconds, full_rss = run_kedro(project, env, "--pipelines", "data_processing")
            # The decoded sets' indexes and the saved listing, as the full run left them.
            saved = [
                *project.glob("data/02_*/*/index.parquet"),
                *project.glob("data/02_*/*.parquet"),
            ]
            state = {path: path.read_bytes() for path in saved}
            write_synthetic(raw, range(size - new, size), batch=new)
            load = uptime()
            reruns: dict[str, list[tuple[float, float]]] = {listing: [] for listing in LISTINGS}
            for _ in range(repeats):
                for listing, runs in reruns.items():
                    for path, content in state.items():
                        path.write_bytes(content)
                    use_listing(project, listing)
                    runs.append(run_kedro(project, env, "--pipelines", "data_processing"))
                    report = data_report(project)
                    assert report["raw_images_decoded"] == size, report["raw_images_decoded"]
                    assert report["files_reused_from_last_run"] == size - new
            # The steps of the full run and of the last 1% rerun each way, before the runs below.
            steps = step_seconds(env["MLFLOW_TRACKING_URI"])
            timings[size] = {
                "full": (steps[0], full_seconds),
                **{
                    listing: (steps[position - len(LISTINGS)], runs[-1][0])
                    for position, (listing, runs) in enumerate(reruns.items())
                },
            }
            # Once more each way with nothing new: what a rerun costs for the images it has.
            idle = {}
            for listing in LISTINGS:
                use_listing(project, listing)
                idle[listing] = run_kedro(project, env, "--pipelines", "data_processing")
                assert data_report(project)["files_reused_from_last_run"] == size
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        for listing, runs in reruns.items():
            rerun_seconds = statistics.median(seconds for seconds, _ in runs)
            spread = f"{min(s for s, _ in runs):.1f}-{max(s for s, _ in runs):.1f}"
            idle_seconds, idle_rss = idle[listing]
            print(
                f"{size:>10}  {listing:<14}{full_seconds:>8.1f}{full_rss:>10.0f}"
                f"{rerun_seconds:>9.1f}{spread:>11}{max(rss for _, rss in runs):>11.0f}"
                f"{rerun_seconds / full_seconds:>7.3f}{idle_seconds:>8.1f}{idle_rss:>10.0f}"
                f"{(rerun_seconds - idle_seconds) / new * 1000:>8.2f}  {load}"
            )
    for size, columns in timings.items():
        print(f"\n{size} images:")
        print_node_seconds(columns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=DEV_ARCHIVE)
    parser.add_argument("--new-fraction", type=float, default=0.01)
    parser.add_argument(
        "--scale", default="", help="comma-separated sizes of synthetic scale runs, e.g. 100000"
    )
    parser.add_argument("--skip-s3", action="store_true", help="only the synthetic scale runs")
    parser.add_argument("--repeats", type=int, default=3, help="reruns per size (median)")
    parser.add_argument(
        "--no-change-queue", action="store_true", help="reruns list every key (no SQS events)"
    )
    args = parser.parse_args()
    if not args.skip_s3:
        s3_run(args.archive, args.new_fraction, change_queue=not args.no_change_queue)
    if args.scale:
        scale_run([int(size) for size in args.scale.split(",")], args.new_fraction, args.repeats)


CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}


def moto_bucket() -> tuple[ThreadedMotoServer, str, s3fs.S3FileSystem]:
    """moto's server on a free loopback port, its endpoint, and an s3fs client with BUCKET."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = s3fs.S3FileSystem(
        endpoint_url=endpoint,
        key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        skip_instance_cache=True,
    )
    s3.mkdir(BUCKET)
    return server, endpoint, s3


def s3_run(archive: Path, new_fraction: float, change_queue: bool) -> None:
    """The dev set in moto's S3: full run, then a rerun with ``new_fraction`` new images; with
    ``change_queue``, the rerun finds them from the bucket's events (SQS) instead of listing."""
    images = read_images(archive)
    names = sorted(images)
    new = set(names[:: round(1 / new_fraction)])
    server, endpoint, s3 = moto_bucket()
    # The kedro runs, and create_event_queue here, find the server and keys as AWS clients do.
    os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1")
    raw = f"{BUCKET}/{PREFIX}/01_raw/mednist"
    workdir = Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    try:
        started = time.perf_counter()
        s3.pipe({f"{raw}/{name}": images[name] for name in names if name not in new}, batch_size=64)
        upload_seconds = time.perf_counter() - started

        queue = ""
        if change_queue:  # after the upload: as on a bucket that held images before the set-up
            queue = create_event_queue(BUCKET, f"{PREFIX}/01_raw/mednist/")
        project = make_project(workdir / "project")
        env = {
            **os.environ,
            "MEDICAL_CT_S3_BUCKET": BUCKET,
            "MEDICAL_CT_S3_PREFIX": PREFIX,
            "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
            "KEDRO_DISABLE_TELEMETRY": "1",
            "PYTHONPATH": str(PROJECT_ROOT / "src"),
            "MEDICAL_CT_RAW_CHANGE_QUEUE": queue,
        }
        env.pop("KEDRO_ENV", None)
        load_full = uptime()
        full_seconds, _ = run_kedro(project, env, "--env", "s3", "--pipelines", "data_processing")
        full_report = json.loads(s3.cat_file(f"{BUCKET}/{PREFIX}/08_reporting/data_report.json"))

        s3.pipe({f"{raw}/{name}": images[name] for name in sorted(new)}, batch_size=64)
        load_rerun = uptime()
        rerun_seconds, _ = run_kedro(project, env, "--env", "s3", "--pipelines", "data_processing")
        rerun_report = json.loads(s3.cat_file(f"{BUCKET}/{PREFIX}/08_reporting/data_report.json"))
        full_nodes, rerun_nodes = first_and_last_steps(env["MLFLOW_TRACKING_URI"])
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    total = rerun_report["raw_images_decoded"] + rerun_report["rejected_count"]
    print(f"MedNIST dev set: {len(images)} images, {len(new)} new in the rerun")
    how = "S3 events in an SQS queue" if change_queue else "listing every key"
    print(f"the rerun finds what is new by: {how}")
    print(f"setup: upload of {len(images) - len(new)} objects to moto  {upload_seconds:8.1f} s")
    print(f"{'':40}{'wall s':>10}{'files read':>12}")
    print(f"{'data_processing, full run':40}{full_seconds:10.1f}{len(images) - len(new):12d}")
    read_again = total - rerun_report["files_reused_from_last_run"]
    rerun_label = f"data_processing, rerun with {new_fraction:.0%} new"
    print(f"{rerun_label:40}{rerun_seconds:10.1f}{read_again:12d}")
    ratio = rerun_seconds / full_seconds
    print(f"rerun / full = {ratio:.3f} (target <= 0.10: {'met' if ratio <= 0.10 else 'NOT met'})")
    print(f"load before the full run: {load_full}")
    print(f"load before the rerun:    {load_rerun}")
    print(f"load after:               {uptime()}")
    print_node_seconds({"full": (full_nodes, full_seconds), "rerun": (rerun_nodes, rerun_seconds)})
    print(f"full run report: {full_report['images_per_split']}")
    print(f"rerun report:    {rerun_report['images_per_split']}")


if __name__ == "__main__":
    main()
