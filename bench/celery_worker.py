"""The Celery baseline: the incumbent inferq should replace, as it is usually deployed.

A Celery app on the same RabbitMQ (its own queue, a quorum queue like inferq's jobs queue), the prefork
pool with 2 processes, late acks (a task is acked once it ran, as inferq acks once the result is stored),
no result backend: each task decodes the inferq job JSON, runs the same onnxruntime model on its row and
stores nothing. Started by the driver as ``celery -A bench.celery_worker worker``; configured by the
``BENCH_CELERY_*`` variables the driver sets.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from celery import Celery
from celery.signals import worker_process_init
from kombu import Queue  # type: ignore[attr-defined,unused-ignore]  # untyped, and absent without the bench extra

from bench.sessions import Session, load_sessions

QUEUE = os.environ.get("BENCH_CELERY_QUEUE", "bench.celery")
app = Celery("bench", broker=os.environ.get("BENCH_CELERY_BROKER", "amqp://guest:guest@127.0.0.1:5672//"))
app.conf.update(
    task_queues=[Queue(QUEUE, queue_arguments={"x-queue-type": "quorum"})],
    task_default_queue=QUEUE,
    task_acks_late=True,
    task_ignore_result=True,
    worker_prefetch_multiplier=4,
    worker_send_task_events=False,
    broker_connection_retry_on_startup=True,
)
_models: dict[str, Session] = {}


@worker_process_init.connect
def _load_models(**_kwargs: Any) -> None:
    # Each prefork child loads its own sessions (one intra-op thread each, like inferq).
    _models.update(load_sessions(Path(os.environ["BENCH_CELERY_MODEL_STORE"])))


@app.task(name="bench.infer")
def infer(body: str) -> None:
    """One job: decode, run the model on its row, compute the outputs, keep nothing."""
    job = json.loads(body)
    model = _models[job["model"]]
    tensor = job["inputs"][0]
    x = np.array(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
    model.session.run(model.output_names, {model.input_name: x})
