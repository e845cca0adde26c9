"""A run that outlives the job time limit is terminated (a real onnxruntime run, not a stand-in)."""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from inferq.model_store.manifest import Manifest
from inferq.shared.errors import ErrorCode
from inferq.worker.runner import Feed, LoadedModel, TimedOut, Watchdog, run_isolating


def endless_model() -> bytes:
    """y = x + 1 repeated 2**62 times: a run that only a terminate ends."""
    body = helper.make_graph(
        [
            helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [None, 1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [None, 1]),
        ],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body)],
        "endless",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])],
        [
            helper.make_tensor("trips", TensorProto.INT64, [], [2**62]),
            helper.make_tensor("cond", TensorProto.BOOL, [], [True]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model).SerializeToString()


def test_a_run_past_the_time_limit_is_terminated_and_every_job_of_the_batch_gets_the_error() -> None:
    session = ort.InferenceSession(endless_model(), providers=["CPUExecutionProvider"])
    manifest = Manifest.model_construct(name="endless", version=1)
    model = LoadedModel(manifest, session, ["y"])
    watchdog = Watchdog(limit_s=0.5)
    feed = Feed.of([{"x": np.zeros((1, 1), np.float32)}, {"x": np.ones((2, 1), np.float32)}])

    started = time.monotonic()
    results = run_isolating(model, feed, watchdog)
    took_s = time.monotonic() - started

    assert all(isinstance(r, TimedOut) for r in results) and len(results) == 2
    assert results[0].code is ErrorCode.INFERENCE_ERROR and "time limit of 0.5s" in str(results[0])
    assert 0.5 <= took_s < 3, took_s
    # The watchdog is reusable: the next run gets its own limit.
    again = time.monotonic()
    [alone] = run_isolating(model, feed.part(0, 1), watchdog)
    assert isinstance(alone, TimedOut) and 0.5 <= time.monotonic() - again < 3
