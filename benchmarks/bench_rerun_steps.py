"""What a data_processing rerun costs for the images it already has, step by step.

    .venv/bin/python benchmarks/bench_rerun_steps.py [--sizes 100000,1000000] [--repeats 3]
        [--against REF]

A rerun with nothing new still reads last run's index, joins it with the listing, writes it
back, dedupes and splits every image and writes the model input: the steps that grow with
the images stored, which ``bench_incremental.py --scale`` shows only as a whole (and needs
20 minutes of writing and decoding a million images for). Here each step runs alone, in one
fresh process per size and repeat, on a synthetic index of N decoded images (files
``<Class>/batch-NNNN/<n>.png``, sha256 content hashes, 4096 images a shard; no pixels: none
of these steps reads any), with the listing of the store equal to the index:

    load previous      ShardedImagesDataset.load of last run's index
    decode_images      the decode node, nothing to decode (the join of listing and index)
    save decoded       ShardedImagesDataset.save (the index; no new shard)
    load decoded       the same set loaded again by each of the three nodes that take it
                       (build_model_input, report_data, report_feedback)
    build_model_input  dedupe and split by content hash
    report_data        counts and the dataset fingerprint
    training manifest  build_training_manifest
    save model input   ModelInputDataset.save of the three splits
    load model input   each split loaded again by the two nodes that take it (report_data,
                       build_training_manifest)

It prints each step's median seconds per size and what each stored image adds (µs/image, the
slope between the smallest and the largest size), and the process's memory: held after the
steps and peak, above what it held before them. ``--against REF`` runs the same steps, in
alternate processes, on a checkout of REF (a git worktree in a temporary folder; REF must
have these nodes and datasets) and adds its figures and the ratio of this tree's to REF's at
the largest size.
"""

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from project import PROJECT_ROOT, checkouts, uptime

# The project's own data_processing parameters (classes, split), as a weekly run has them.
PARAMETERS = PROJECT_ROOT / "conf/base/parameters_data_processing.yml"
STEPS = [
    "load previous",
    "decode_images",
    "save decoded",
    "load decoded",
    "build_model_input",
    "report_data",
    "training manifest",
    "save model input",
    "load model input",
]


def measure(size: int) -> dict:
    """Seconds of each step and MiB held and peak, in this process, on ``size`` images, in a
    temporary folder deleted after (145 MB of indexes at a million images)."""
    with tempfile.TemporaryDirectory(prefix="bench-rerun-steps-") as folder:
        return measure_in(Path(folder), size)


def measure_in(folder: Path, size: int) -> dict:
    """``measure`` with the indexes written under ``folder``."""
    import hashlib

    import numpy as np
    import pandas as pd
    import psutil
    import pyarrow as pa
    import yaml

    from medical_ct.datasets import StoredFiles
    from medical_ct.pipelines.data_processing import nodes
    from medical_ct.shards import (
        INDEX_DTYPES,
        ModelInputDataset,
        ShardedImages,
        ShardedImagesDataset,
    )

    params = yaml.safe_load(PARAMETERS.read_text())["data_processing"]
    classes = params["classes"]
    files = sorted(
        f"{classes[n % len(classes)]}/batch-{n * 100 // size:04d}/{n:08d}.png" for n in range(size)
    )
    versions = [f"{150 + n % 100}-{1764000000 + n}.000000" for n in range(size)]
    index = pd.DataFrame(
        {
            "file": files,
            "version": versions,
            "label": [file.partition("/")[0] for file in files],
            "content_hash": [
                hashlib.sha256(n.to_bytes(8, "little")).hexdigest() for n in range(size)
            ],
            "shard": [f"{n // 4096:024x}.npy" for n in range(size)],
            "row": np.arange(size) % 4096,
            "reason": "",
            "reused": False,
        }
    ).astype(INDEX_DTYPES)
    decoded = ShardedImagesDataset(path=str(folder / "decoded_raw"))
    decoded.save(ShardedImages(index))  # what a full run left, as the tree writes it
    decoded.release()  # a new run: it reads the file
    listing = StoredFiles(pa.table({"file": files, "version": versions}), None, str(folder))
    del index, files, versions
    sources = {"raw": str(folder / "decoded_raw"), "feedback": str(folder / "decoded_feedback")}
    model_input = {
        split: ModelInputDataset(path=str(folder / split), shards_from=sources)
        for split in ("train", "validation", "test")
    }
    process = psutil.Process()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS from here on (Linux)
    before = process.memory_info().rss
    seconds = {}

    def step(name, run):
        started = time.perf_counter()
        result = run()
        seconds[name] = time.perf_counter() - started
        return result

    previous = step("load previous", decoded.load)
    raw = step("decode_images", lambda: nodes.decode_images(listing, previous, params))
    previous = None  # released, as Kedro releases it after the node
    step("save decoded", lambda: decoded.save(raw))
    raw = step("load decoded", lambda: load_each(decoded, 3))
    feedback_set = ShardedImagesDataset(path=sources["feedback"])  # empty, typed as loaded
    feedback_set.save(nodes.decode_images({}, None, params))
    feedback = load_each(feedback_set, 1)
    *sets, class_names, stats = step(
        "build_model_input", lambda: nodes.build_model_input(raw, feedback, params)
    )
    step("report_data", lambda: nodes.report_data(*sets, class_names, raw, feedback, stats))
    step("training manifest", lambda: nodes.build_training_manifest(*sets, class_names, {}))
    step(
        "save model input",
        lambda: [data.save(s) for data, s in zip(model_input.values(), sets, strict=True)],
    )
    step("load model input", lambda: [load_each(data, 2) for data in model_input.values()])
    status = Path("/proc/self/status").read_text()
    peak = int(status.split("VmHWM:")[1].split()[0]) * 1024  # since the reset
    return {
        **seconds,
        "all steps": sum(seconds.values()),
        "held MiB": (process.memory_info().rss - before) / 2**20,
        "peak MiB": (peak - before) / 2**20,
    }


def load_each(dataset, loads: int):
    """``dataset`` loaded ``loads`` times, by as many nodes one after the other, each copy
    dropped after its node as Kedro drops it: the last one."""
    for _ in range(loads - 1):
        dataset.load()  # and dropped before the next load
    return dataset.load()


def run_child(src: Path, size: int) -> dict:
    """``measure(size)`` in a fresh process importing ``medical_ct`` from ``src``."""
    done = subprocess.run(
        [sys.executable, __file__, "--one", str(size), "--src", str(src)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        sys.exit(f"the steps at {size} images failed ({src}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per size")
    parser.add_argument("--against", help="a git ref to measure the same steps on")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        sys.path.insert(0, str(args.src))
        print(json.dumps(measure(args.one)))
        return
    sizes = [int(size) for size in args.sizes.split(",")]
    with checkouts(args.against) as checked_out:
        trees = {name: tree / "src" for name, tree in checked_out.items()}
        print(f"load before: {uptime()}")
        runs = {(tree, size): [] for tree in trees for size in sizes}
        for _ in range(args.repeats):
            for size in sizes:
                for tree, src in trees.items():  # alternately: the same load for each
                    runs[tree, size].append(run_child(src, size))
        print(f"load after:  {uptime()}")
    report(runs, trees, sizes)


def report(runs: dict, trees: dict, sizes: list[int]) -> None:
    """Median of each figure per size for each tree, what each stored image adds, the ratio."""
    small, large = sizes[0], sizes[-1]

    def median(tree: str, size: int, figure: str) -> float:
        return statistics.median(run[figure] for run in runs[tree, size])

    figures = [*STEPS, "all steps", "held MiB", "peak MiB"]
    print(f"\nrerun with nothing new, median of {len(runs[next(iter(runs))])} processes each")
    for tree in trees:
        print(f"\n{tree:20}" + "".join(f"{f'{size:,}':>14}" for size in sizes) + "  per image")
        for figure in figures:
            values = [median(tree, size, figure) for size in sizes]
            per_image = (values[-1] - values[0]) / (large - small) if large > small else 0.0
            unit = (
                f"{per_image * 2**20:8.0f} B" if "MiB" in figure else f"{per_image * 1e6:8.2f} µs"
            )
            print(f"{figure:20}" + "".join(f"{value:14.3f}" for value in values) + f"  {unit}")
    if len(trees) == 2:
        this, other = trees
        print(f"\nthis tree / {other} at {large:,} images:")
        for figure in figures:
            print(f"  {figure:20}{median(this, large, figure) / median(other, large, figure):6.2f}")


if __name__ == "__main__":
    main()
