"""Adaptive batching of /predict: requests that arrive while a batch runs form the next batch.

A lone request runs at once (no added latency); under load, batches grow up to
``max_batch_size`` and each forward pass serves many requests.
"""

import asyncio
from collections.abc import Callable
from typing import Any

import anyio
import numpy as np


class OverloadedError(RuntimeError):
    """A request waited longer than the latency bound before its batch started."""


class BatchResultsMismatchError(RuntimeError):
    """The batch function returned another number of results than it was given inputs."""


class AdaptiveBatcher:
    """Runs ``infer`` (a blocking function of a stacked batch) on batches of queued requests.

    Args:
        infer: Takes ``(n, ...)`` stacked inputs and returns ``n`` results, in order; a result
            that is an exception fails its own request only, another count of results fails
            the whole batch (``BatchResultsMismatchError``).
        max_batch_size: Largest batch passed to ``infer``.
        max_latency_ms: A request still queued after this long is refused (overload), so
            latency stays bounded instead of the queue growing without end.
    """

    def __init__(
        self, infer: Callable[[np.ndarray], list[Any]], max_batch_size: int, max_latency_ms: int
    ) -> None:
        self._infer = infer
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_latency_ms / 1000
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item: np.ndarray) -> Any:
        """The result of ``infer`` for ``item``, computed in a batch with concurrent requests."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run())
        future = loop.create_future()
        await self._queue.put((item, future, loop.time()))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pending = [await self._queue.get()]
            while len(pending) < self._max_batch_size and not self._queue.empty():
                pending.append(self._queue.get_nowait())
            now = loop.time()
            batch = []
            for item, future, queued_at in pending:
                if future.cancelled():
                    continue
                if now - queued_at > self._max_wait_s:
                    future.set_exception(
                        OverloadedError(
                            f"the service is overloaded: waited more than "
                            f"{self._max_wait_s * 1000:.0f} ms for a batch"
                        )
                    )
                else:
                    batch.append((item, future))
            if not batch:
                continue
            try:
                results = await anyio.to_thread.run_sync(
                    self._infer, np.stack([item for item, _ in batch])
                )
            except Exception as error:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            _deliver([future for _, future in batch], results)


def _deliver(futures: list[asyncio.Future], results: list[Any]) -> None:
    """Each result to its request: an exception fails that request alone.

    Results of another length than the batch fail every request of it: which result is whose
    cannot be told, and pairing them as far as they go left the requests after the last result
    waiting until their timeout (and the batcher's task dead, with the next batch queued).
    """
    if len(results) != len(futures):
        error = BatchResultsMismatchError(
            f"the batch function returned {len(results)} results for {len(futures)} requests: "
            "it must return one result per input, in order (a bug in the model's classify)"
        )
        results = [error] * len(futures)
    for future, result in zip(futures, results, strict=True):
        if future.done():
            continue
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)
