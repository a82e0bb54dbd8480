"""The adaptive batcher of /predict, run for real on an event loop with a blocking function."""

import asyncio

import numpy as np

from medical_ct.serving.batching import AdaptiveBatcher

IMAGES = [np.full((2, 2), value, np.uint8) for value in range(3)]


def run_batch(infer, images: list[np.ndarray]) -> list:
    """What each of ``images``, submitted at once (one batch), gets: a result or an error;
    then what a request after them gets. Waits 10 s at most for each."""
    batcher = AdaptiveBatcher(infer, max_batch_size=8, max_latency_ms=5000)

    async def batch_then_one() -> list:
        requests = asyncio.gather(*map(batcher.submit, images), return_exceptions=True)
        answers = await asyncio.wait_for(requests, timeout=10)
        return [*answers, await asyncio.wait_for(batcher.submit(images[0]), timeout=10)]

    return asyncio.run(batch_then_one())


def wrong_once(extra: int, calls: list[int]):
    """A batch function whose first call returns ``extra`` more results than it has inputs
    (fewer when negative); later calls are right."""

    def infer(images: np.ndarray) -> list[int]:
        calls.append(len(images))
        results = [int(image[0, 0]) for image in images]
        if len(calls) > 1:
            return results
        return results + [0] * extra if extra > 0 else results[: len(results) + extra]

    return infer


def test_a_batch_given_too_few_results_fails_all_its_requests_at_once():
    """zip(strict=True) answered the first requests, then raised in the batcher's task: the
    requests left over waited until their timeout, with no error said."""
    calls = []

    *batch, after = run_batch(wrong_once(-1, calls), IMAGES)

    assert calls == [3, 1]
    assert all(isinstance(error, RuntimeError) for error in batch), batch
    assert "returned 2 results for 3 requests" in str(batch[0])
    assert after == 0  # the batcher still serves


def test_a_batch_given_too_many_results_fails_all_its_requests():
    """Which result belongs to which request cannot be told: none is answered."""
    *batch, after = run_batch(wrong_once(1, []), IMAGES)

    assert all(isinstance(error, RuntimeError) for error in batch), batch
    assert "returned 4 results for 3 requests" in str(batch[0])
    assert after == 0
