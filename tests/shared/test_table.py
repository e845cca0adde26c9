"""Rows of named columns become the tensors a model takes, typed as the model needs them."""

from __future__ import annotations

from typing import Any

import pytest

from inferq.model_store.manifest import TensorSpec
from inferq.shared.contract.messages import Datatype
from inferq.shared.errors import InvalidPayload
from inferq.shared.tables.table import Column, RowError, Table, convert

MIXED = Table(
    "mixed",
    3,
    (
        Column(name="city", datatype=Datatype.BYTES, input="city"),
        Column(name="age", datatype=Datatype.FP32, input="age"),
        Column(name="zone", datatype=Datatype.INT64, input="zone"),
    ),
    named=True,
)


@pytest.mark.parametrize(
    ("value", "datatype", "expected"),
    [
        ("61", Datatype.FP32, 61.0),
        (61, Datatype.FP32, 61.0),
        (" 2 ", Datatype.INT64, 2),
        ("2.0", Datatype.INT64, 2),
        (2.0, Datatype.INT64, 2),
        (61, Datatype.BYTES, "61"),
        ("rome", Datatype.BYTES, "rome"),
        ("", Datatype.BYTES, ""),
        ("true", Datatype.BOOL, True),
        (0, Datatype.BOOL, False),
    ],
)
def test_a_value_is_read_as_the_type_the_model_needs(value: Any, datatype: Datatype, expected: Any) -> None:
    converted = convert(value, datatype)
    assert converted == expected and type(converted) is type(expected)


@pytest.mark.parametrize(
    ("value", "datatype", "problem"),
    [
        ("old", Datatype.FP32, "'old' is not a number"),
        ("nan", Datatype.FP32, "'nan' is not a finite number"),
        ("", Datatype.FP32, "'' is not a number"),
        (True, Datatype.FP32, "True is not a number"),
        (2.5, Datatype.INT64, "2.5 is not an integer"),
        (300, Datatype.UINT8, "300 is out of range for UINT8"),
        (None, Datatype.BYTES, "no value"),
        ([1], Datatype.BYTES, "[1] is not a string"),
        ("maybe", Datatype.BOOL, "'maybe' is not a boolean"),
    ],
)
def test_a_value_that_does_not_fit_says_why(value: Any, datatype: Datatype, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        convert(value, datatype)


def test_rows_by_name_become_one_tensor_per_column_in_any_key_order_with_extras_ignored() -> None:
    rows = [{"zone": "2", "age": 61, "city": "rome", "extra": "x"}, {"city": "oslo", "age": "30.5", "zone": 1}]
    tensors = {t.name: t for t in MIXED.rows_to_tensors(rows)}
    city = {"name": "city", "shape": [2, 1], "datatype": "BYTES", "data": ["rome", "oslo"]}
    assert tensors["city"].model_dump() == city
    assert (tensors["age"].shape, tensors["age"].datatype, tensors["age"].data) == ([2, 1], "FP32", [61.0, 30.5])
    assert (tensors["zone"].datatype, tensors["zone"].data) == ("INT64", [2, 1])


def test_rows_as_arrays_go_by_column_order_and_a_mapping_of_columns_gives_the_same_tensors() -> None:
    by_name = MIXED.rows_to_tensors([{"city": "rome", "age": 61, "zone": 2}, {"city": "oslo", "age": 30, "zone": 1}])
    by_position = MIXED.rows_to_tensors([["rome", 61, 2], ["oslo", 30, 1]])
    by_column = MIXED.columns_to_tensors({"age": [61, 30], "zone": [2, 1], "city": ["rome", "oslo"]})
    assert by_name == by_position == by_column


def test_a_missing_column_names_the_row_and_the_column() -> None:
    with pytest.raises(RowError) as caught:
        MIXED.rows_to_tensors([{"city": "rome", "age": 1, "zone": 1}, {"city": "rome", "zone": 1}])
    assert str(caught.value) == "row 2: column 'age': missing (model 'mixed' version 3 reads city, age, zone)"


def test_a_value_of_the_wrong_type_names_the_row_the_column_and_the_type() -> None:
    with pytest.raises(RowError) as caught:
        MIXED.rows_to_tensors([{"city": "rome", "age": "old", "zone": 1}])
    assert str(caught.value) == "row 1: column 'age': 'old' is not a number (FP32 needed)"


def test_columns_feeding_one_input_sit_side_by_side_in_it() -> None:
    spec = [Column(name=n, datatype=Datatype.FP32, input="X") for n in ("a", "b", "c")]
    table = Table("gbr", 1, tuple(spec), named=True)
    (tensor,) = table.rows_to_tensors([{"c": 3, "a": 1, "b": 2}, {"a": 4, "b": 5, "c": 6}])
    assert (tensor.name, tensor.shape, tensor.data) == ("X", [2, 3], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])


def test_a_model_without_names_takes_rows_by_position_and_checks_their_width() -> None:
    table = Table.of("iris", 2, None, [TensorSpec(name="X", datatype=Datatype.FP32, shape=[None, 4])])
    (tensor,) = table.rows_to_tensors([["5.1", 3.5, 1.4, 0.2]])
    assert (tensor.name, tensor.shape, tensor.data) == ("X", [1, 4], [5.1, 3.5, 1.4, 0.2])
    with pytest.raises(RowError, match="row 1: 3 values, model 'iris' version 2 takes 4"):
        table.rows_to_tensors([[1, 2, 3]])
    with pytest.raises(InvalidPayload, match="names no columns"):
        table.columns_to_tensors({"a": [1]})


def test_a_model_of_dynamic_width_takes_rows_of_one_width() -> None:
    table = Table.of("any", 1, None, [TensorSpec(name="X", datatype=Datatype.FP64, shape=[None, None])])
    (tensor,) = table.rows_to_tensors([[1, 2], [3, 4]])
    assert (tensor.shape, tensor.datatype) == ([2, 2], "FP64")
    with pytest.raises(InvalidPayload, match="rows of different widths"):
        table.rows_to_tensors([[1, 2], [3]])


def test_a_model_of_several_unnamed_inputs_has_no_table() -> None:
    inputs = [
        TensorSpec(name="a", datatype=Datatype.FP32, shape=[None, 3]),
        TensorSpec(name="b", datatype=Datatype.FP32, shape=[None, 2]),
    ]
    with pytest.raises(InvalidPayload, match="send KServe tensors"):
        Table.of("multi", 1, None, inputs)
