"""Measure ``put_many`` of every result store in one run: results/s for batches of 256 and 2,048.

Stores: a directory (files), SQLite, PostgreSQL (the local server, a schema of its own, dropped at the
end) and, with ``--s3``, S3 (a local SeaweedFS on free ports). Rounds are interleaved, so every store
sees the same machine load; the medians are printed. Each result is a fresh object (its JSON encoding is
part of the cost, as in the worker; building them is not), ~450 bytes like a two-output classifier's.

With ``--drain-jobs N``, also N one-row jobs drained by one in-process worker against each store (the
local RabbitMQ; a 50-tree forest; first job taken to last ack).

    .venv/bin/python scripts/result_store_throughput.py [--results 16384] [--rounds 3] [--s3] [--drain-jobs 5000]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from seaweedfs import SeaweedFS

from inferq.shared.contract.messages import Result, Status, Tensor, Timings
from inferq.shared.results.stores import open_result_store

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
BUCKET = "inferq-bench"
BATCHES = (256, 2048)


def fake_result(job_id: str) -> Result:
    return Result(
        id=job_id,
        model="churn",
        requested_version="latest",
        version=1,
        model_sha256="0" * 64,
        status=Status.SUCCEEDED,
        outputs=[
            Tensor(name="label", shape=[1], datatype="INT64", data=[1]),
            Tensor(name="probabilities", shape=[1, 2], datatype="FP32", data=[0.25, 0.75]),
        ],
        worker="bench:1",
        timings=Timings(queue_ms=1.0, inference_ms=0.1, total_ms=2.0),
    )


def results_per_s(location: str, batch: int, total: int) -> float:
    store = open_result_store(location)
    try:
        tag = uuid.uuid4().hex[:8]
        store.put_many([fake_result(f"warm-{tag}")])  # connections, schema
        # Built before the clock starts: the worker builds its results whatever the store. Their JSON
        # encoding is left to put_many, as in the worker, where the store is the first to ask for it.
        batches = [
            [fake_result(f"{tag}-{i}") for i in range(start, min(start + batch, total))]
            for start in range(0, total, batch)
        ]
        started = time.perf_counter()
        for results in batches:
            store.put_many(results)
        return total / (time.perf_counter() - started)
    finally:
        store.close()


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            yield f"{POSTGRES}?options=-csearch_path%3D{schema}"
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def drain_rates(work: Path, locations: dict[str, Callable[[], str]], jobs: int, rounds: int) -> None:
    """Worker drain jobs/s per store, interleaved rounds, medians."""
    from s3_throughput import FEATURES, jobs_per_s  # noqa: PLC0415  (the model and drain of that script)
    from sklearn.datasets import make_classification  # noqa: PLC0415
    from sklearn.ensemble import RandomForestClassifier  # noqa: PLC0415

    from inferq.model_store.base import publish  # noqa: PLC0415
    from inferq.model_store.convert import estimator_to_onnx  # noqa: PLC0415
    from inferq.model_store.local import LocalModelStore  # noqa: PLC0415
    from inferq.shared.config.logging import configure_logging  # noqa: PLC0415

    configure_logging("warning", "console")
    X, y = make_classification(n_samples=2000, n_features=FEATURES, random_state=7)
    forest = RandomForestClassifier(n_estimators=50, max_depth=6, random_state=7).fit(X, y)
    publish(LocalModelStore(work / "models"), "churn", estimator_to_onnx(forest))
    drains: dict[str, list[float]] = {store: [] for store in locations}
    for _ in range(rounds):
        for store, location in locations.items():
            drains[store].append(jobs_per_s(work / "models", location(), jobs))
    print(f"\none in-process worker draining {jobs} one-row jobs, jobs/s (median of {rounds} interleaved rounds)")
    for store, values in drains.items():
        print(f"{store:<12}{sorted(values)[len(values) // 2]:>14,.0f}   runs {[round(v) for v in values]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=int, default=16384, help="results per store, batch size and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--s3", action="store_true", help="also S3 (a local SeaweedFS; fewer results)")
    parser.add_argument("--drain-jobs", type=int, default=0, help="also worker drains of this many jobs per store")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="inferq-store-bench-"))
    with contextlib.ExitStack() as stack:
        locations: dict[str, Callable[[], str]] = {
            "file": lambda: f"file://{work / uuid.uuid4().hex[:8]}",
            "sqlite": lambda: f"sqlite:{work / uuid.uuid4().hex[:8]}.db",
        }
        pg = stack.enter_context(postgres_schema())
        locations["postgresql"] = lambda: pg
        if args.s3:
            server = stack.enter_context(SeaweedFS())
            server.create_bucket(BUCKET)
            import os  # noqa: PLC0415

            os.environ.update(server.environ)
            locations["s3"] = lambda: f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
        rates: dict[tuple[str, int], list[float]] = {(s, b): [] for s in locations for b in BATCHES}
        for _ in range(args.rounds):
            for store, location in locations.items():
                for batch in BATCHES:
                    total = args.results if store != "s3" else min(args.results, 2 * batch)
                    rates[(store, batch)].append(results_per_s(location(), batch, total))
        print(f"put_many results/s, median of {args.rounds} interleaved rounds ({args.results} results each)")
        print(f"{'store':<12}" + "".join(f"{f'batch {b}':>14}" for b in BATCHES))
        for store in locations:
            medians = [sorted(rates[(store, b)])[len(rates[(store, b)]) // 2] for b in BATCHES]
            print(f"{store:<12}" + "".join(f"{m:>14,.0f}" for m in medians))
        if args.drain_jobs:
            drain_rates(work, locations, args.drain_jobs, args.rounds)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
