"""A batch's outputs are split back per job exactly as the general per-array path would, as the
manifest's batch dimension says: an output with a batch axis by rows, a fixed-size one whole to every job,
and one that fits neither by running each job alone."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper

from inferq.model_store.manifest import TensorSpec, build_manifest
from inferq.shared.contract.messages import DATATYPE_OF_NUMPY, Datatype, OutputTensor, Result
from inferq.worker.runner import Feed, LoadedModel, _split, load_model, run_isolating


def rows(array: npt.NDArray[Any]) -> TensorSpec:
    """The manifest's spec of ``array`` as an output with a batch axis (a dynamic leading dimension)."""
    datatype = DATATYPE_OF_NUMPY.get(array.dtype, Datatype.BYTES)
    return TensorSpec(name="out", datatype=datatype, shape=[None, *array.shape[1:]])


def fixed(array: npt.NDArray[Any]) -> TensorSpec:
    """The manifest's spec of ``array`` as a fixed-size output."""
    return TensorSpec(name="out", datatype=DATATYPE_OF_NUMPY[array.dtype], shape=list(array.shape))


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
    assert _split("out", array, counts, rows(array)) == _reference("out", array, counts)


def test_an_output_without_a_row_axis_goes_to_every_job() -> None:
    scalar = np.asarray(np.float32(0.5))
    assert _split("out", scalar, [1, 1], fixed(scalar)) == [OutputTensor.from_numpy("out", scalar)] * 2


def test_string_outputs_take_the_general_path() -> None:
    labels = np.array(["a", "b", "c"], dtype=object)
    assert _split("label", labels, [2, 1], rows(labels)) == _reference("label", labels, [2, 1])


def test_non_finite_outputs_go_out_as_strings_and_read_back_as_floats() -> None:
    array = np.array([[np.nan, 1.0], [np.inf, -np.inf]], dtype=np.float32)
    first, second = _split("p", array, [1, 1], rows(array))
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


def _model(
    nodes: list[onnx.NodeProto], outputs: list[onnx.ValueInfoProto], initializers: list[onnx.TensorProto]
) -> bytes:
    graph = helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])], outputs, initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model).SerializeToString()


def _loaded(data: bytes) -> LoadedModel:
    return load_model(build_manifest("m", 1, data, "onnx", {}), data)


def _one_row_jobs(count: int) -> Feed:
    return Feed.of([{"x": np.array([[10.0 * i, 10.0 * i + 1]], np.float32)} for i in range(count)])


def fixed_size_model() -> bytes:
    """y = x, plus two outputs of fixed size: three class labels, and a 2 x 3 table."""
    return _model(
        [
            helper.make_node("Identity", ["x"], ["y"]),
            helper.make_node("Identity", ["label_values"], ["labels"]),
            helper.make_node("Identity", ["table_values"], ["table"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2]),
            helper.make_tensor_value_info("labels", TensorProto.INT64, [3]),
            helper.make_tensor_value_info("table", TensorProto.FLOAT, [2, 3]),
        ],
        [
            helper.make_tensor("label_values", TensorProto.INT64, [3], [7, 8, 9]),
            helper.make_tensor("table_values", TensorProto.FLOAT, [2, 3], [0.5, 1.5, 2.5, 3.5, 4.5, 5.5]),
        ],
    )


@pytest.mark.parametrize("jobs", [3, 2], ids=["as-many-jobs-as-labels", "as-many-jobs-as-table-rows"])
def test_a_fixed_size_output_goes_whole_to_every_job_even_when_its_size_equals_the_row_count(jobs: int) -> None:
    # Given a model with fixed-size outputs (no batch axis in the manifest), and a batch whose row count
    # happens to equal the leading dimension of one of them
    model = _loaded(fixed_size_model())

    # When the batch runs
    results = run_isolating(model, _one_row_jobs(jobs))

    # Then every job gets its own row of y, and each fixed-size output whole
    for i, result in enumerate(results):
        assert not isinstance(result, Exception)
        y, labels, table = result
        assert y.shape == [1, 2] and y.data == [10.0 * i, 10.0 * i + 1]
        assert labels.shape == [3] and labels.data == [7, 8, 9]
        assert table.shape == [2, 3] and table.data == [0.5, 1.5, 2.5, 3.5, 4.5, 5.5]


def per_batch_model() -> bytes:
    """flat = x as one dimension: a batch axis (dynamic), but two values per input row, not one."""
    return _model(
        [helper.make_node("Reshape", ["x", "flat_shape"], ["flat"])],
        [helper.make_tensor_value_info("flat", TensorProto.FLOAT, [None])],
        [helper.make_tensor("flat_shape", TensorProto.INT64, [1], [-1])],
    )


def test_an_output_with_a_batch_axis_but_not_a_row_per_input_row_is_never_copied_to_other_jobs() -> None:
    # Given a model whose output has a batch axis that does not match the input rows
    model = _loaded(per_batch_model())
    assert model.manifest.outputs[0].shape == [None]

    # When a batch of three jobs runs
    results = run_isolating(model, _one_row_jobs(3))

    # Then each job gets only its own values (it ran alone), never the whole batch's
    for i, result in enumerate(results):
        assert not isinstance(result, Exception)
        [flat] = result
        assert flat.shape == [2] and flat.data == [10.0 * i, 10.0 * i + 1]
