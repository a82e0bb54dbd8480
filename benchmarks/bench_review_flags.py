"""What the review queue's flags cost each ``GET /review`` after years of feedback.

    .venv/bin/python benchmarks/bench_review_flags.py [--pending 20000,100000] [--new 5]
        [--calls 5]

The flags that compare (the same image under another label, a submitter's burst) look at
every pending record ever sent. Side by side, in one process, on N pending records as the
worker's cache holds them (submitters and times spread as a month of traffic would be):
the index built anew from all of them (``Submissions.of``: what every ``GET /review`` did
before the queue kept it) against the kept index extended with the ``--new`` records read
since the last request (``Submissions.add``). Prints the median seconds a call and the ratio.
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from bench_feedback import reviewed_item

from medical_ct.serving.review import Submissions


def pending_records(count: int) -> dict[str, dict]:
    """``count`` pending records in the order a listing reads them (by id, not by time), from
    50 submitters over a month; each parsed from JSON, as the cache holds it."""
    start, records = datetime(2026, 11, 1, tzinfo=UTC), {}
    for number in range(count):
        feedback_id, _, record, _ = reviewed_item(number)
        sent = start + timedelta(seconds=(number * 7919) % (30 * 86400))
        record |= {"submitter": f"10.0.{number % 50}.1", "submitted_at": sent.isoformat()}
        records[feedback_id] = json.loads(json.dumps(record))
    return records


def median_seconds(call: Callable[[], object], calls: int) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pending", default="20000,100000")
    parser.add_argument("--new", type=int, default=5, help="records read since the last call")
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    print(f"{'pending records':>16}{'built anew':>14}{'kept, extended':>16}{'ratio':>10}")
    for count in map(int, args.pending.split(",")):
        records = pending_records(count + args.new * args.calls)
        ids = list(records)
        anew = median_seconds(lambda records=records: Submissions.of(records), args.calls)
        kept = Submissions.of({key: records[key] for key in ids[:count]})
        extended = []
        for call in range(1, args.calls + 1):  # the worker's cache, grown by --new records
            grown = {key: records[key] for key in ids[: count + call * args.new]}
            started = time.perf_counter()
            kept.add(grown)
            extended.append(time.perf_counter() - started)
        kept_seconds = statistics.median(extended)
        print(f"{count:>16,}{anew:>13.4f}s{kept_seconds:>15.4f}s{kept_seconds / anew:>10.3f}")


if __name__ == "__main__":
    main()
