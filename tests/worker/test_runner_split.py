"""A batch's outputs are split back per job exactly as the general per-array path would."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from shared.messages import Tensor
from worker.runner import _split


def _reference(name: str, array: npt.NDArray[Any], counts: list[int]) -> list[Tensor]:
    return [Tensor.from_numpy(name, part) for part in np.split(array, np.cumsum(counts)[:-1])]


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
    assert _split("out", scalar, [1, 1]) == [Tensor.from_numpy("out", scalar)] * 2


def test_string_outputs_take_the_general_path() -> None:
    labels = np.array(["a", "b", "c"], dtype=object)
    assert _split("label", labels, [2, 1]) == _reference("label", labels, [2, 1])
