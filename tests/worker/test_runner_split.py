"""A batch's outputs are split back per job exactly as the general per-array path would."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from inferq.shared.contract.messages import OutputTensor, Result
from inferq.worker.runner import _split


def _reference(name: str, array: npt.NDArray[Any], counts: list[int]) -> list[OutputTensor]:
    return [OutputTensor.from_numpy(name, part) for part in np.split(array, np.cumsum(counts)[:-1])]


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(6, 2),  # probabilities
        np.arange(6, dtype=np.int64),  # labels
        np.arange(24, dtype=np.float64).reshape(6, 2, 2),
    ],
    ids=["2-d", "1-d", "3-d"],
)
def test_split_matches_splitting_each_job_separately(array: npt.NDArray[Any]) -> None:
    counts = [1, 3, 0, 2]
    assert _split("out", array, counts) == _reference("out", array, counts)


def test_an_output_without_a_row_axis_goes_to_every_job() -> None:
    scalar = np.asarray(np.float32(0.5))
    assert _split("out", scalar, [1, 1]) == [OutputTensor.from_numpy("out", scalar)] * 2


def test_string_outputs_take_the_general_path() -> None:
    labels = np.array(["a", "b", "c"], dtype=object)
    assert _split("label", labels, [2, 1]) == _reference("label", labels, [2, 1])


def test_non_finite_outputs_go_out_as_strings_and_read_back_as_floats() -> None:
    array = np.array([[np.nan, 1.0], [np.inf, -np.inf]], dtype=np.float32)
    first, second = _split("p", array, [1, 1])
    assert first.data == ["NaN", 1.0] and second.data == ["Infinity", "-Infinity"]
    wire = Result(id="a", model="m", requested_version=1, status="succeeded", outputs=[first, second], worker="w")
    assert b'"data":["NaN",1.0]' in wire.to_json()
    read = Result.model_validate_json(wire.to_json())
    assert read.outputs is not None
    assert np.isnan(read.outputs[0].to_numpy()[0, 0]) and list(read.outputs[1].to_numpy()[0]) == [np.inf, -np.inf]


def test_a_result_stored_with_null_for_a_non_finite_output_is_readable() -> None:
    body = (
        b'{"id":"a","model":"m","requested_version":1,"status":"succeeded","worker":"w",'
        b'"outputs":[{"name":"p","shape":[1,2],"datatype":"FP32","data":[null,0.5]}]}'
    )
    read = Result.model_validate_json(body)
    assert read.outputs is not None and np.isnan(read.outputs[0].data[0]) and read.outputs[0].data[1] == 0.5
