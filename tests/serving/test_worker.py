"""A service worker's process set-up (``serving.worker``), run in a fresh interpreter: the
thread pools and the collector are per process, and the test's own must stay as they are."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT

WORKER_SETUP = """
import gc, json, os, sys
import torch
from threadpoolctl import threadpool_info
from sklearn.covariance import LedoitWolf  # loads the BLAS and OpenMP pools the fit uses
from medical_ct.serving.worker import freeze_startup_heap, share_cores

before = {pool["filepath"]: pool["num_threads"] for pool in threadpool_info()}
share = share_cores(int(sys.argv[1]))
after = {pool["filepath"]: pool["num_threads"] for pool in threadpool_info()}
freeze_startup_heap()
print(json.dumps({
    "cores": os.cpu_count(), "share": share, "torch": torch.get_num_threads(),
    "before": before, "after": after, "frozen": gc.get_freeze_count(),
}))
"""


def worker_setup(workers: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", WORKER_SETUP, str(workers)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={  # the pools' defaults: a thread per core
            **{name: value for name, value in os.environ.items() if "NUM_THREADS" not in name},
            "PYTHONPATH": str(PROJECT_ROOT / "src"),
        },
    )
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("workers", [1, 2, 64])
def test_each_thread_pool_of_a_worker_gets_its_share_of_the_cores(workers):
    """numpy's OpenBLAS, left at a thread per core, spun on cores the other worker needed:
    the out-of-distribution fit of a model swap stalled its worker for ~0.5 s (CI's 503)."""
    setup = worker_setup(workers)
    share = max(1, setup["cores"] // workers)
    assert setup["share"] == share and setup["torch"] == share
    assert setup["after"], "no BLAS or OpenMP pool was found to limit"
    assert set(setup["after"].values()) == {share}
    if workers > 1 and setup["cores"] > 1:  # what it fixes: pools started at a thread per core
        assert max(setup["before"].values()) > share


def test_what_a_worker_built_at_start_is_frozen_out_of_the_collector():
    assert worker_setup(2)["frozen"] > 100_000  # the imports alone: torch, sklearn
