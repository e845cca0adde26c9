"""The naive baseline: a worker written the way the pika tutorial writes one.

``BlockingConnection``, ``prefetch_count=1``, and per message: ``json.loads``, one onnxruntime call,
``basic_publish`` of the result, ``basic_ack``. Runs until SIGTERM, then writes its counters as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from typing import Any

import numpy as np
import pika

from bench.sessions import load_sessions, system_arguments, tensor_json


def main() -> None:
    args = system_arguments(__doc__)

    models = load_sessions(args.model_store)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    counters = {"jobs": 0, "onnx_calls": 0, "ort_s": 0.0}

    connection = pika.BlockingConnection(pika.URLParameters(args.amqp_url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=1)

    def on_request(ch: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
        job = json.loads(body)
        model = models[job["model"]]
        tensor = job["inputs"][0]
        x = np.array(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        started = time.perf_counter()
        outputs = model.session.run(model.output_names, {model.input_name: x})
        counters["ort_s"] += time.perf_counter() - started
        counters["onnx_calls"] += 1
        published_ms = (props.headers or {}).get("x-inferq-published-ms")
        result = {
            "id": job["id"],
            "model": job["model"],
            "requested_version": job.get("version", "latest"),
            "version": model.version,
            "model_sha256": model.sha256,
            "status": "succeeded",
            "outputs": [tensor_json(n, o) for n, o in zip(model.output_names, outputs, strict=True)],
            "error": None,
            "worker": worker,
            "timings": {"total_ms": time.time() * 1000 - published_ms if published_ms else None},
        }
        ch.basic_publish(
            exchange="",
            routing_key=args.results_queue,
            body=json.dumps(result),
            properties=pika.BasicProperties(
                content_type="application/json", delivery_mode=pika.DeliveryMode.Persistent, message_id=job["id"]
            ),
        )
        ch.basic_ack(delivery_tag=method.delivery_tag)
        counters["jobs"] += 1

    channel.basic_consume(queue=args.jobs_queue, on_message_callback=on_request)
    signal.signal(signal.SIGTERM, lambda *_: connection.add_callback_threadsafe(channel.stop_consuming))
    channel.start_consuming()
    connection.close()
    args.stats.write_text(json.dumps(counters))


if __name__ == "__main__":
    main()
