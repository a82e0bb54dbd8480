"""What each service worker sets up in its own process: its share of the cores for every
thread pool in it, and, once its first model is loaded, a heap the garbage collector no longer
walks.

Both were found by a rollback test that failed in CI (2026-12-05): a /predict queued past
``max_latency_ms`` got 503 "overloaded" while the champion moved. Measured on this 2-core
machine, 2 workers, 4 clients, two busy processes standing for the other work CI runs, the
alias moved 8 times (``benchmarks/bench_swap.py``).
"""

import gc
import os

import torch
from threadpoolctl import threadpool_limits


def share_cores(workers: int) -> int:
    """Limit each thread pool of this worker to its share of the cores; return the share.

    Workers share the cores, and so do the pools inside one: torch's, and the OpenBLAS and
    OpenMP pools of numpy, scipy and scikit-learn, which fit the out-of-distribution reference
    at each model swap (``ood.OodReference.fit``). Left at a thread per core, OpenBLAS's
    threads spun on cores the other worker needed: a fit of 20-50 ms took 350-680 ms, and the
    whole worker stalled with it (a batch of one image 480 ms, decoding an upload 470 ms).
    Call it after the imports: it limits the libraries loaded by then.
    """
    threads = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(threads)
    threadpool_limits(threads)
    return threads


def freeze_startup_heap() -> None:
    """Keep what the worker built at start out of every later garbage collection.

    The imports, the project and the first model (with what loading it imports lazily) are
    ~760,000 objects that live as long as the worker. CPython's full collections walked them
    every time, holding the interpreter: 200-550 ms every few seconds under load, and every
    request of the worker waited. Frozen (``gc.freeze``), they are skipped: full collections
    took 70-160 ms under the same load. The first model's own reference cycles are frozen with
    it, so after the first swap its memory (0.4 MB on the sample) is kept, once a worker. The
    collection before freezing adds 0.4-0.5 s to each worker's start.
    """
    gc.collect()
    gc.freeze()
