"""The ideal pipeline: one in-process loop doing only what is unavoidable for a confirmed, acked result.

Consume with a large prefetch, decode with orjson, one onnxruntime call per model per batch of at most
256 rows (a batch is whatever one socket read delivered), publish every result with confirms, and ack
the batch's deliveries with one ``multiple`` ack once their results are confirmed. No result store, no
validation beyond decoding, no logging. Runs until SIGTERM, then writes its counters as JSON.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import time
from collections import deque
from typing import Any

import numpy as np
import orjson
import pika
from pika.adapters.select_connection import IOLoop

from bench.confirms import Confirmed
from bench.sessions import Session, load_sessions, system_arguments, tensor_json

PREFETCH = 1024
MAX_BATCH_ROWS = 256


class IdealPipeline:
    """The loop: everything runs on pika's I/O thread, in delivery order."""

    def __init__(self, args: argparse.Namespace, models: dict[str, Session]) -> None:
        self.args = args
        self.models = models
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.ioloop = IOLoop()
        self.channel: Any = None
        self.pending: list[tuple[int, dict[str, Any], float | None]] = []
        self.flush_scheduled = False
        self.published = 0
        self.confirmed = Confirmed()
        self.to_ack: deque[tuple[int, int]] = deque()  # (last publish seq of a batch, last delivery tag of it)
        self.counters = {"jobs": 0, "onnx_calls": 0, "ort_s": 0.0, "batches": 0}
        self.connection = pika.SelectConnection(
            pika.URLParameters(args.amqp_url),
            on_open_callback=lambda c: c.channel(on_open_callback=self.on_channel),
            on_close_callback=lambda *_: self.ioloop.stop(),
            custom_ioloop=self.ioloop,
        )

    def on_channel(self, channel: Any) -> None:
        self.channel = channel
        channel.confirm_delivery(ack_nack_callback=self.on_confirm)
        channel.basic_qos(
            prefetch_count=PREFETCH, callback=lambda _f: channel.basic_consume(self.args.jobs_queue, self.on_message)
        )

    def on_message(self, _ch: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
        published_ms = (props.headers or {}).get("x-inferq-published-ms")
        self.pending.append((method.delivery_tag, orjson.loads(body), published_ms))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.ioloop.call_later(0, self.flush)  # runs once the frames of this socket read are handled

    def flush(self) -> None:
        self.flush_scheduled = False
        pending, self.pending = self.pending, []
        by_model: dict[str, list[tuple[dict[str, Any], float | None]]] = {}
        for _tag, job, published_ms in pending:
            by_model.setdefault(job["model"], []).append((job, published_ms))
        for name, jobs in by_model.items():
            for start in range(0, len(jobs), MAX_BATCH_ROWS):
                self.run(self.models[name], jobs[start : start + MAX_BATCH_ROWS])
        self.to_ack.append((self.published, pending[-1][0]))
        self.counters["batches"] += 1

    def run(self, model: Session, jobs: list[tuple[dict[str, Any], float | None]]) -> None:
        x = np.array([job["inputs"][0]["data"] for job, _ in jobs], dtype=np.float32)
        started = time.perf_counter()
        outputs = model.session.run(model.output_names, {model.input_name: x})
        self.counters["ort_s"] += time.perf_counter() - started
        self.counters["onnx_calls"] += 1
        now_ms = time.time() * 1000
        for row, (job, published_ms) in enumerate(jobs):
            result = {
                "id": job["id"],
                "model": job["model"],
                "requested_version": job.get("version", "latest"),
                "version": model.version,
                "model_sha256": model.sha256,
                "status": "succeeded",
                "outputs": [tensor_json(n, o[row : row + 1]) for n, o in zip(model.output_names, outputs, strict=True)],
                "error": None,
                "worker": self.worker,
                "timings": {"total_ms": now_ms - published_ms if published_ms else None},
            }
            props = pika.BasicProperties(
                content_type="application/json", delivery_mode=pika.DeliveryMode.Persistent, message_id=job["id"]
            )
            self.channel.basic_publish("", self.args.results_queue, orjson.dumps(result), props)
            self.published += 1
        self.counters["jobs"] += len(jobs)

    def on_confirm(self, frame: Any) -> None:
        method = frame.method
        if not isinstance(method, pika.spec.Basic.Ack):
            raise SystemExit("the broker refused a result publish")
        through = self.confirmed.add(method.delivery_tag, method.multiple)
        last_tag = None
        while self.to_ack and self.to_ack[0][0] <= through:
            last_tag = self.to_ack.popleft()[1]
        if last_tag is not None:
            self.channel.basic_ack(last_tag, multiple=True)

    def stop(self) -> None:
        self.connection.close()


def main() -> None:
    args = system_arguments(__doc__)
    loop = IdealPipeline(args, load_sessions(args.model_store))
    signal.signal(signal.SIGTERM, lambda *_: loop.ioloop.add_callback_threadsafe(loop.stop))
    loop.ioloop.start()
    args.stats.write_text(orjson.dumps(loop.counters).decode())


if __name__ == "__main__":
    main()
