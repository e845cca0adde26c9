"""A run that outlives the job time limit is terminated (a real onnxruntime run, not a stand-in), and a
batch that hits the limit is isolated so that only its really slow jobs fail, within a bounded number of
terminated runs."""

from __future__ import annotations

import uuid

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from support import Env, audit

from inferq.model_store.base import publish
from inferq.model_store.manifest import build_manifest
from inferq.shared.contract.messages import Job, Status, Tensor
from inferq.shared.errors import ErrorCode
from inferq.worker.runner import (
    TIMED_OUT_RUNS_PER_BATCH,
    Feed,
    LoadedModel,
    TimedOut,
    Watchdog,
    load_model,
    run_isolating,
)

SLOW = 1e15
"""An input value that makes :func:`slow_when_large_model` loop (in effect) forever."""


def _loop_body() -> onnx.GraphProto:
    """acc = acc + 0, once per trip: the identity, at a cost per trip."""
    return helper.make_graph(
        [
            helper.make_node("Add", ["acc_in", "zero"], ["acc_out"]),
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
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])],
    )


def _model(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto], name: str) -> bytes:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model).SerializeToString()


def slow_when_large_model() -> bytes:
    """y = x, computed by a loop of max(x) trips: a batch is as slow as its largest input value."""
    return _model(
        [
            helper.make_node("ReduceMax", ["x"], ["largest"], keepdims=0),
            helper.make_node("Cast", ["largest"], ["trips"], to=TensorProto.INT64),
            helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=_loop_body()),
        ],
        [helper.make_tensor("cond", TensorProto.BOOL, [], [True])],
        "slow_when_large",
    )


def endless_model() -> bytes:
    """y = x + 0 repeated 2**62 times: a run that only a terminate ends."""
    return _model(
        [helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=_loop_body())],
        [
            helper.make_tensor("trips", TensorProto.INT64, [], [2**62]),
            helper.make_tensor("cond", TensorProto.BOOL, [], [True]),
        ],
        "endless",
    )


def loaded(name: str, data: bytes) -> LoadedModel:
    return load_model(build_manifest(name, 1, data, "onnx", {}), data)


class CountingWatchdog(Watchdog):
    """A watchdog that remembers every run it armed, to count those it terminated."""

    def __init__(self, limit_s: float) -> None:
        super().__init__(limit_s)
        self.runs: list[ort.RunOptions] = []

    def arm(self) -> ort.RunOptions:
        options = super().arm()
        self.runs.append(options)
        return options

    @property
    def terminated(self) -> int:
        return sum(options.terminate for options in self.runs)


def jobs(values: list[float]) -> Feed:
    return Feed.of([{"x": np.full((1, 1), value, np.float32)} for value in values])


def test_a_run_past_the_time_limit_is_terminated_with_an_inference_error() -> None:
    model = loaded("endless", endless_model())
    watchdog = CountingWatchdog(limit_s=0.3)

    [result] = run_isolating(model, jobs([0.0]), watchdog)

    assert isinstance(result, TimedOut) and result.code is ErrorCode.INFERENCE_ERROR
    assert "exceeded the job time limit of 0.3s" in str(result)
    assert watchdog.terminated == 1
    # The watchdog is reusable: the next run gets its own limit.
    [again] = run_isolating(model, jobs([1.0]), watchdog)
    assert isinstance(again, TimedOut) and watchdog.terminated == 2


def test_in_a_timed_out_batch_only_the_slow_job_fails_and_the_others_get_their_own_outputs() -> None:
    # Given a batch of 40 jobs of a model whose run time grows with its input, one of them slow
    model = loaded("slow_when_large", slow_when_large_model())
    values = [float(1 + i % 5) for i in range(40)]
    values[23] = SLOW
    watchdog = CountingWatchdog(limit_s=0.3)

    # When the batch runs and hits the time limit
    results = run_isolating(model, jobs(values), watchdog)

    # Then only the slow job failed, with the time-out, and every other job got its own output
    failed = [i for i, r in enumerate(results) if isinstance(r, TimedOut)]
    assert failed == [23]
    assert results[23].code is ErrorCode.INFERENCE_ERROR and "time limit of 0.3s" in str(results[23])
    for value, result in zip(values, results, strict=True):
        if value != SLOW:
            assert not isinstance(result, Exception) and result[0].data == [value], result
    # And isolating it cost two terminated runs (the batch's and the slow job's alone), not one per
    # level of a bisection, let alone one per job
    assert watchdog.terminated == 2


def test_a_batch_with_many_slow_jobs_stops_isolating_at_the_budget_of_terminated_runs() -> None:
    # Given a batch of six jobs that are all slow
    model = loaded("endless", endless_model())
    watchdog = CountingWatchdog(limit_s=0.2)

    # When it runs
    results = run_isolating(model, jobs([1.0] * 6), watchdog)

    # Then the watchdog terminated no more runs than the budget (the batch and two jobs alone), and the
    # jobs not run alone got the time-out too, saying so
    assert watchdog.terminated == TIMED_OUT_RUNS_PER_BATCH
    assert all(isinstance(r, TimedOut) for r in results)
    assert ["not run" in str(r) for r in results] == [False, False, True, True, True, True]


def slow_when_large_job(value: float) -> Job:
    tensor = Tensor(name="x", shape=[1, 1], datatype="FP32", data=[value])
    return Job(id=uuid.uuid4().hex, model="slow_when_large", inputs=[tensor])


@pytest.mark.broker
def test_a_worker_gives_each_job_of_a_batch_that_hit_the_time_limit_its_own_result(env: Env) -> None:
    # Given 40 fast jobs and one slow one, queued together
    publish(env.store, "slow_when_large", slow_when_large_model())
    jobs = [slow_when_large_job(float(1 + i % 5)) for i in range(40)]
    jobs.insert(17, slow_when_large_job(SLOW))
    assert len(env.submit(jobs)) == len(jobs)

    # When a worker drains them in batches (waiting to fill them) with a short time limit
    env.drain(job_timeout_s=0.5, max_wait_ms=500)

    # Then every job has its one result: the slow one failed with the time-out, the others succeeded
    report = audit(env, {job.id: job for job in jobs})
    assert report.stored == len(jobs)
    stored = env.stored()
    slow = stored[jobs[17].id]
    assert slow.status is Status.FAILED and slow.error is not None
    assert slow.error.code is ErrorCode.INFERENCE_ERROR and "time limit of 0.5s" in slow.error.message
    for job in jobs[:17] + jobs[18:]:
        result = stored[job.id]
        assert result.status is Status.SUCCEEDED and result.outputs is not None
        assert result.outputs[0].data == job.inputs[0].data
