"""data_processing on the MedNIST dev set in a real S3 server: full run versus a rerun with 1% new.

    .venv/bin/python benchmarks/bench_incremental.py [--archive PATH] [--new-fraction 0.01]

1. Starts moto's S3 server on a free loopback port and uploads 99% of the dev set's images to
   the bucket's raw prefix (parallel batched PUTs through s3fs; timed, not part of the figures).
2. `kedro run --env s3 --pipeline data_processing` in a fresh temporary project: every image
   is read from the bucket and decoded (the full run).
3. Uploads the remaining 1% and runs again: only the new objects are read and decoded, the
   rest comes from the last run's decoded set in the bucket (the incremental rerun).
4. Prints both wall times, the ratio (target: rerun <= 10% of the full run) and the counts of
   the data report.
"""

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import s3fs
from moto.server import ThreadedMotoServer
from project import PROJECT_ROOT, make_project

sys.path.insert(0, str(PROJECT_ROOT / "src"))
from medical_ct.mednist import read_images

DEV_ARCHIVE = PROJECT_ROOT / "../shared/data/mednist/MedNIST-dev.tar.gz"
BUCKET = "medical-ct-bench"
PREFIX = "bench"
KEDRO = str(Path(sys.executable).with_name("kedro"))


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def timed_run(project: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(
        [KEDRO, "run", "--env", "s3", "--pipeline", "data_processing"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"kedro run failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=DEV_ARCHIVE)
    parser.add_argument("--new-fraction", type=float, default=0.01)
    args = parser.parse_args()

    images = read_images(args.archive)
    names = sorted(images)
    new = set(names[:: round(1 / args.new_fraction)])
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    credentials = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    s3 = s3fs.S3FileSystem(
        endpoint_url=endpoint,
        key=credentials["AWS_ACCESS_KEY_ID"],
        secret=credentials["AWS_SECRET_ACCESS_KEY"],
        skip_instance_cache=True,
    )
    s3.mkdir(BUCKET)
    raw = f"{BUCKET}/{PREFIX}/01_raw/mednist"
    workdir = Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    try:
        started = time.perf_counter()
        s3.pipe({f"{raw}/{name}": images[name] for name in names if name not in new}, batch_size=64)
        upload_seconds = time.perf_counter() - started

        project = make_project(workdir / "project")
        env = {
            **os.environ,
            **credentials,
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "MEDICAL_CT_S3_BUCKET": BUCKET,
            "MEDICAL_CT_S3_PREFIX": PREFIX,
            "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
            "KEDRO_DISABLE_TELEMETRY": "1",
            "PYTHONPATH": str(PROJECT_ROOT / "src"),
        }
        env.pop("KEDRO_ENV", None)
        load_full = uptime()
        full_seconds = timed_run(project, env)
        full_report = json.loads(s3.cat_file(f"{BUCKET}/{PREFIX}/08_reporting/data_report.json"))

        s3.pipe({f"{raw}/{name}": images[name] for name in sorted(new)}, batch_size=64)
        load_rerun = uptime()
        rerun_seconds = timed_run(project, env)
        rerun_report = json.loads(s3.cat_file(f"{BUCKET}/{PREFIX}/08_reporting/data_report.json"))
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    total = rerun_report["raw_images_decoded"] + rerun_report["rejected_count"]
    print(f"MedNIST dev set: {len(images)} images, {len(new)} new in the rerun")
    print(f"setup: upload of {len(images) - len(new)} objects to moto  {upload_seconds:8.1f} s")
    print(f"{'':40}{'wall s':>10}{'files read':>12}")
    print(f"{'data_processing, full run':40}{full_seconds:10.1f}{len(images) - len(new):12d}")
    read_again = total - rerun_report["files_reused_from_last_run"]
    print(f"{'data_processing, rerun with 1% new':40}{rerun_seconds:10.1f}{read_again:12d}")
    ratio = rerun_seconds / full_seconds
    print(f"rerun / full = {ratio:.3f} (target <= 0.10: {'met' if ratio <= 0.10 else 'NOT met'})")
    print(f"load before the full run: {load_full}")
    print(f"load before the rerun:    {load_rerun}")
    print(f"load after:               {uptime()}")
    print(f"full run report: {full_report['images_per_split']}")
    print(f"rerun report:    {rerun_report['images_per_split']}")


if __name__ == "__main__":
    main()
