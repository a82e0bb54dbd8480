"""Reading every feedback record from S3: one GET at a time against one gathered read.

    .venv/bin/python benchmarks/bench_records_s3.py [--records 1000] [--latency-ms 0,20]

The review service's first look at its stores, a full rescan and monitoring's first run read
every record (tens of thousands after years of review). This starts moto's S3 server in its
own process, adding ``--latency-ms`` to each request (a stand-in for S3's time to first
byte: moto on loopback answers in about a millisecond, S3 in tens), writes N records with
``RecordsDataset`` and reads them all back both ways, alternately: each loader called in
turn (one GET after another, as before) and ``RecordLoaders.fetched`` (fsspec's ``cat`` of the
list, which s3fs gathers). It prints both times and their ratio per latency. moto's server
is Python on these 2 cores: gathered reads are bound by its CPU, so the ratio understates
what a real S3 gives.
"""

import argparse
import multiprocessing
import os
import statistics
import time

import fsspec
from project import uptime

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}


def serve(latency_ms: float, ports: multiprocessing.Queue) -> None:
    """moto's S3 server with ``latency_ms`` slept before each request (threads: they overlap)."""
    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)

    def slow(environ, start_response):
        time.sleep(latency_ms / 1000)
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, slow, threaded=True, request_handler=MotoRequestHandler)
    ports.put(server.server_address[1])
    server.serve_forever()


def start_server(latency_ms: float) -> tuple[multiprocessing.Process, str]:
    """moto's server (``serve``) in its own process, and its endpoint URL."""
    ports: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(latency_ms, ports), daemon=True)
    server.start()
    return server, f"http://127.0.0.1:{ports.get(timeout=60)}"


def read_both_ways(latency_ms: float, records: int, repeats: int) -> dict[str, list[float]]:
    from medical_ct.datasets import RecordsDataset

    server, url = start_server(latency_ms)
    try:
        endpoint = {"endpoint_url": url}
        fsspec.filesystem("s3", **endpoint).mkdir("bench-records")
        store = RecordsDataset(path="s3://bench-records/records", credentials=endpoint)
        store.save({f"Hand-{n:032x}": {"label": "Hand", "n": n} for n in range(records)})
        times: dict[str, list[float]] = {"one at a time": [], "gathered": []}
        for _ in range(repeats):
            loaders = store.load()
            started = time.perf_counter()
            one_by_one = {key: loaders[key]() for key in loaders}
            times["one at a time"].append(time.perf_counter() - started)
            started = time.perf_counter()
            gathered = {key: load() for key, load in loaders.fetched(list(loaders)).items()}
            times["gathered"].append(time.perf_counter() - started)
            assert gathered == one_by_one and len(gathered) == records
        return times
    finally:
        server.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--latency-ms", default="0,20")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.update({**CREDENTIALS, "AWS_DEFAULT_REGION": "us-east-1"})
    print(f"load before: {uptime()}")
    print(f"{args.records} records, median of {args.repeats}")
    print(f"{'added latency':>14} {'one at a time':>16} {'gathered':>12} {'ratio':>8}")
    for latency in (float(value) for value in args.latency_ms.split(",")):
        times = read_both_ways(latency, args.records, args.repeats)
        alone, gathered = (statistics.median(times[way]) for way in ("one at a time", "gathered"))
        print(f"{latency:>11.0f} ms {alone:>14.2f} s {gathered:>10.2f} s {gathered / alone:>8.3f}")
    print(f"load after:  {uptime()}")


if __name__ == "__main__":
    main()
