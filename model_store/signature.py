"""A job's inputs checked against a model version's ONNX signature, as the manifest records it.

Both sides apply the same rules: the worker before it runs a job, the HTTP gateway before it accepts one,
so a request refused at the door gets the code a worker would have given it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from inferq.model_store.manifest import Manifest, TensorSpec
from inferq.shared.contract.messages import Job, Tensor
from inferq.shared.errors import InputMismatch, TooLarge

Arrays = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-job bounds enforced before anything runs."""

    max_rows_per_job: int
    max_elements_per_tensor: int


def prepare_inputs(job: Job, manifest: Manifest, limits: Limits) -> Arrays:
    """The job's tensors as arrays, checked against the model's signature; raises a :class:`JobError`."""
    given = check_inputs(job, manifest, limits)
    return {spec.name: given[spec.name].to_numpy() for spec in manifest.inputs}


def check_inputs(job: Job, manifest: Manifest, limits: Limits) -> dict[str, Tensor]:
    """The job's tensors by input name, their names, types, shapes and sizes checked against the model's
    signature (not their data: converting it is :meth:`Tensor.to_numpy`'s, or a whole batch's at once);
    raises a :class:`JobError`."""
    if len(job.inputs) == 1 and len(manifest.inputs) == 1 and job.inputs[0].name == manifest.inputs[0].name:
        # One input, the common case of a scikit-learn model: the same checks, without the sets.
        tensor = job.inputs[0]
        count = _check_tensor(tensor, manifest.inputs[0], limits)
        if count > limits.max_rows_per_job:
            raise TooLarge(f"job has {count} rows, above the limit of {limits.max_rows_per_job}")
        return {tensor.name: tensor}
    given = {t.name: t for t in job.inputs}
    if len(given) != len(manifest.inputs) or any(spec.name not in given for spec in manifest.inputs):
        expected = {spec.name for spec in manifest.inputs}
        # Named columns are inputs of their own: name what is missing or unexpected, not only the sets.
        missing, extra = sorted(expected - set(given)), sorted(set(given) - expected)
        gap = "; ".join(
            part for part in (f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else "") if part
        )
        raise InputMismatch(f"model {manifest.name!r} v{manifest.version} takes inputs {sorted(expected)}: {gap}")
    rows = {_check_tensor(given[spec.name], spec, limits) for spec in manifest.inputs}
    if len(rows) > 1:
        raise InputMismatch(f"inputs disagree on the number of rows: {sorted(rows)}")
    if next(iter(rows)) > limits.max_rows_per_job:
        raise TooLarge(f"job has {next(iter(rows))} rows, above the limit of {limits.max_rows_per_job}")
    return given


def _check_tensor(tensor: Tensor, spec: TensorSpec, limits: Limits) -> int:
    """The tensor's row count, once its size, datatype and shape fit ``spec``."""
    shape = tensor.shape
    elements = math.prod(shape)
    if elements > limits.max_elements_per_tensor:
        raise TooLarge(
            f"input {tensor.name!r} has {elements} elements, above the limit of {limits.max_elements_per_tensor}"
        )
    if tensor.datatype is not spec.datatype:
        raise InputMismatch(f"input {tensor.name!r} must be {spec.datatype}, job sent {tensor.datatype}")
    if len(shape) != len(spec.shape) or any(
        want is not None and got != want for got, want in zip(shape[1:], spec.shape[1:], strict=True)
    ):
        wanted = ["N" if d is None else d for d in spec.shape]
        raise InputMismatch(f"input {tensor.name!r} must have shape {wanted}, job sent {shape}")
    return shape[0]
