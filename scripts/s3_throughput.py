"""Measure result writes to S3 and worker throughput with the S3 result store next to the file one.

Starts a local SeaweedFS (free ports, stopped at the end) and uses the local RabbitMQ. In one run, the
two ways of writing a result object side by side: boto3's ``put_object`` and the lean PUT signed by
botocore (``shared/s3/put.py``), interleaved over ``--repeat`` rounds:
1. results/s: ``S3ResultStore.put_many`` of batches of results, at several write concurrencies;
2. jobs/s: the same jobs drained by one in-process worker, with a file result store and with the S3
   one each way (the model store is a directory in all, so only the result store differs).

    .venv/bin/python scripts/s3_throughput.py [--jobs 3000] [--batch 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pika
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seaweedfs import SeaweedFS

from inferq.model_store.base import publish
from inferq.model_store.convert import estimator_to_onnx
from inferq.model_store.local import LocalModelStore
from inferq.model_store.registry import Registry
from inferq.producer.client import Producer
from inferq.shared.broker.amqp import delete_topology
from inferq.shared.config.logging import configure_logging
from inferq.shared.config.settings import ProducerSettings, WorkerSettings
from inferq.shared.contract.messages import Job, Result, Status, Tensor, Timings
from inferq.shared.results.s3 import S3ResultStore
from inferq.shared.s3.location import S3Location
from inferq.worker.runner import LoadedModel, load_model
from inferq.worker.worker import Worker, build_worker

AMQP_URL = os.environ.get("INFERQ_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
BUCKET = "inferq-bench"
FEATURES = 8


def fake_result(index: int) -> Result:
    """A result of the size a two-output classifier produces for one row."""
    return Result(
        id=f"r-{uuid.uuid4().hex}-{index}",
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


def results_per_s(batch: int, batches: int, concurrency: int, lean: bool) -> float:
    where = S3Location(BUCKET, f"put-{concurrency}-{uuid.uuid4().hex[:6]}/")
    store = S3ResultStore(where, concurrency=concurrency, lean=lean)
    store.put_many([fake_result(i) for i in range(batch)])  # warm the connection pool
    work = [[fake_result(i) for i in range(batch)] for _ in range(batches)]
    started = time.perf_counter()
    for results in work:
        store.put_many(results)
    elapsed = time.perf_counter() - started
    store.close()
    return batch * batches / elapsed


def jobs_per_s(models_dir: Path, result_store: str, jobs: int, lean: bool = True) -> float:
    queue = f"bench.{uuid.uuid4().hex[:10]}"
    common = {
        "amqp_url": AMQP_URL,
        "jobs_queue": f"{queue}.jobs",
        "results_queue": f"{queue}.results",
        "model_store": str(models_dir),
        "result_store": result_store,
    }
    rows = np.random.default_rng(1).normal(size=(jobs, FEATURES)).astype(np.float32)
    batch = [
        Job(
            id=uuid.uuid4().hex,
            model="churn",
            version="latest",
            inputs=[Tensor(name="X", shape=[1, FEATURES], datatype="FP32", data=row.tolist())],
        )
        for row in rows
    ]
    with Producer(ProducerSettings(**common)) as producer:
        producer.publish_many(batch)
    settings = WorkerSettings(**common, drain_poll_ms=50)
    if result_store.startswith("s3://"):
        store = S3ResultStore(S3Location.parse(result_store), lean=lean)
        registry: Registry[LoadedModel] = Registry(LocalModelStore(models_dir), load_model)
        counters = Worker(settings, registry, store, drain=True).run()
    else:
        counters = build_worker(settings, drain=True).run()
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    delete_topology(channel, settings)
    connection.close()
    assert counters.succeeded == jobs, counters
    assert counters.first_job_at is not None and counters.last_ack_at is not None
    return jobs / (counters.last_ack_at - counters.first_job_at)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    configure_logging("warning", "console")
    work = Path(tempfile.mkdtemp(prefix="inferq-s3-bench-"))
    X, y = make_classification(n_samples=2000, n_features=FEATURES, random_state=7)
    onnx_bytes = estimator_to_onnx(RandomForestClassifier(n_estimators=50, max_depth=6, random_state=7).fit(X, y))
    publish(LocalModelStore(work / "models"), "churn", onnx_bytes)
    ways = {"boto3 put_object": False, "lean signed PUT": True}
    with SeaweedFS() as server:
        server.create_bucket(BUCKET)
        os.environ.update(server.environ)
        print(f"SeaweedFS at {server.endpoint}; {os.cpu_count()} CPUs; {args.repeat} interleaved rounds, medians")
        print(f"\nput_many of {args.batches} batches x {args.batch} results (~{len(fake_result(0).to_json())} B each)")
        for concurrency in (8, 16, 32):
            rates: dict[str, list[float]] = {way: [] for way in ways}
            for _ in range(args.repeat):
                for way, lean in ways.items():
                    rates[way].append(results_per_s(args.batch, args.batches, concurrency, lean))
            line = ", ".join(f"{way} {_median(r):8,.0f}/s" for way, r in rates.items())
            ratios = [b / a for a, b in zip(*rates.values(), strict=True)]
            print(f"  {concurrency:>2} concurrent writes: {line}; lean/boto3 {_median(ratios):.2f}")
        print(f"\none in-process worker, {args.jobs} one-row jobs, first job taken to last ack")
        drains: dict[str, list[float]] = {"file": [], **{way: [] for way in ways}}
        for _ in range(args.repeat):
            drains["file"].append(jobs_per_s(work / "models", str(work / f"results-{uuid.uuid4().hex[:6]}"), args.jobs))
            for way, lean in ways.items():
                where = f"s3://{BUCKET}/results-{uuid.uuid4().hex[:6]}"
                drains[way].append(jobs_per_s(work / "models", where, args.jobs, lean))
        for way, rates_ in drains.items():
            print(f"  {way + ' result store:':<32} {_median(rates_):8,.0f} jobs/s  (runs {[round(r) for r in rates_]})")
        ratios = [b / a for a, b in zip(drains["boto3 put_object"], drains["lean signed PUT"], strict=True)]
        print(f"  lean/boto3 worker jobs/s: median {_median(ratios):.2f} (runs {[round(r, 2) for r in ratios]})")


if __name__ == "__main__":
    main()
