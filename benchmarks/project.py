"""What the benchmarks share: a fresh Kedro project around this repo's conf, a timed
`kedro run` with its peak memory, and where each run's time went."""

import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
KEDRO = str(Path(sys.executable).with_name("kedro"))


def make_project(root: Path, tree: Path = PROJECT_ROOT) -> Path:
    """A project using ``tree``'s conf (this repo's by default) and the installed package, with
    its own data and store."""
    shutil.copytree(tree / "conf", root / "conf")
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy(tree / name, root / name)
    (root / "src").mkdir()
    return root


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def run_kedro(project: Path, env: dict[str, str], *args: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one `kedro run`, in a fresh wrapper process so that
    only this run's kedro process counts."""
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "started = time.perf_counter()\n"
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "seconds = time.perf_counter() - started\n"
        "if done.returncode: sys.exit(done.stdout[-3000:] + done.stderr[-3000:])\n"
        "print(seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", wrapper, KEDRO, "run", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        sys.exit(f"kedro run {' '.join(args)} failed:\n{result.stderr[-6000:]}")
    seconds, max_rss_kib = result.stdout.split()
    return float(seconds), int(max_rss_kib) / 1024


def step_seconds(tracking_uri: str) -> list[dict[str, float]]:
    """Seconds per node, dataset load and save of every MLflow run, oldest first: the metrics
    NodeTimingHook logs (``node_seconds.<node>``, ``load_seconds.<dataset>``, ...)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    runs = client.search_runs(experiments, order_by=["attributes.start_time ASC"])
    prefixes = ("node_seconds.", "load_seconds.", "save_seconds.")
    return [
        {name: value for name, value in run.data.metrics.items() if name.startswith(prefixes)}
        for run in runs
    ]


@contextlib.contextmanager
def checkouts(against: str | None) -> Iterator[dict[str, Path]]:
    """This tree, and with ``against`` a checkout of that git ref (a worktree in a temporary
    folder, removed after), by name: what a benchmark runs side by side."""
    trees = {"this tree": PROJECT_ROOT}
    with tempfile.TemporaryDirectory(prefix="bench-against-") as worktree:
        if against:
            subprocess.run(
                ["git", "-C", str(PROJECT_ROOT), "worktree", "add", "--detach", "-f", worktree,
                 against], check=True, capture_output=True,
            )  # fmt: skip
            trees[against] = Path(worktree)
        try:
            yield trees
        finally:
            if against:
                subprocess.run(
                    ["git", "-C", str(PROJECT_ROOT), "worktree", "remove", "--force", worktree],
                    check=False, capture_output=True,
                )  # fmt: skip
