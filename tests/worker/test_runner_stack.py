"""A batch's inputs become one onnxruntime feed, converted as each job alone would be; jobs whose data
cannot be converted get their own error and the others still run together."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from inferq.model_store.manifest import TensorSpec
from inferq.shared.contract.messages import Datatype, Tensor
from inferq.shared.errors import InvalidPayload, JobError
from inferq.worker.runner import Feed, stack_inputs

X = TensorSpec(name="x", datatype=Datatype.FP32, shape=[None, 3])


def job(data: list[Any], rows: int = 1, spec: TensorSpec = X) -> dict[str, Tensor]:
    tail = [d for d in spec.shape[1:] if d is not None] or [len(data) // max(rows, 1)]
    return {spec.name: Tensor.model_construct(name=spec.name, shape=[rows, *tail], datatype=spec.datatype, data=data)}


def test_a_plain_batch_is_one_feed_equal_to_converting_each_job() -> None:
    jobs = [job([1, 2, 3]), job([4.5, 5, 6, 7, 8, 9], rows=2), job([], rows=0), job([True, 0, -1.25])]
    feeds, refused = stack_inputs(jobs, [X])
    assert refused == {}
    [(indices, feed)] = feeds
    assert indices == [0, 1, 2, 3] and feed.counts == [1, 2, 0, 1]
    expected = np.concatenate([j["x"].to_numpy() for j in jobs])
    assert feed.arrays["x"].dtype == np.float32 and np.array_equal(feed.arrays["x"], expected)
    # As a sequence, the feed is each job's own inputs.
    assert len(feed) == 4 and np.array_equal(feed[1]["x"], expected[1:3]) and feed[2]["x"].shape == (0, 3)


@pytest.mark.parametrize(
    "bad",
    [[1, "2", 3], [1e300, 0, 0]],
    ids=["a string among numbers", "a number beyond FP32"],
)
def test_a_job_whose_data_cannot_be_converted_gets_its_own_error_and_the_others_share_a_feed(bad: list[Any]) -> None:
    jobs = [job([1, 2, 3]), job(bad), job([7, 8, 9])]
    feeds, refused = stack_inputs(jobs, [X])
    assert list(refused) == [1] and isinstance(refused[1], InvalidPayload)
    [(indices, feed)] = feeds
    assert indices == [0, 2] and np.array_equal(feed.arrays["x"], np.array([[1, 2, 3], [7, 8, 9]], np.float32))


def test_jobs_whose_other_dimensions_differ_run_in_feeds_of_their_own() -> None:
    free = TensorSpec(name="x", datatype=Datatype.INT64, shape=[None, None])
    jobs = [job([1, 2], spec=free), job([3, 4, 5], spec=free), job([6, 7], spec=free)]
    jobs[1]["x"] = Tensor.model_construct(name="x", shape=[1, 3], datatype=Datatype.INT64, data=[3, 4, 5])
    feeds, refused = stack_inputs(jobs, [free])
    assert refused == {}
    assert sorted((indices, feed.arrays["x"].tolist()) for indices, feed in feeds) == [
        ([0, 2], [[1, 2], [6, 7]]),
        ([1], [[3, 4, 5]]),
    ]


def test_strings_stay_strings_and_numbers_where_strings_belong_are_refused() -> None:
    text = TensorSpec(name="city", datatype=Datatype.BYTES, shape=[None, 1])
    feeds, refused = stack_inputs([job(["Oslo"], spec=text), job([3], spec=text)], [text])
    assert list(refused) == [1] and isinstance(refused[1], JobError)
    [(indices, feed)] = feeds
    assert indices == [0] and feed.arrays["city"].dtype == object and feed.arrays["city"].tolist() == [["Oslo"]]


def test_a_part_of_a_feed_is_its_jobs_rows() -> None:
    feed = Feed.of([{"x": np.full((n, 2), n, np.float32)} for n in (1, 3, 2)])
    part = feed.part(1, 3)
    assert part.counts == [3, 2] and part.bounds == [0, 3, 5]
    assert part.arrays["x"][:, 0].tolist() == [3, 3, 3, 2, 2]
