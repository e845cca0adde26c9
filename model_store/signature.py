"""A job's inputs checked against a model version's ONNX signature, as the manifest records it.

Both sides apply the same rules: the worker before it runs a job, the HTTP gateway before it accepts one,
so a request refused at the door gets the code a worker would have given it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from model_store.manifest import Manifest, TensorSpec
from shared.errors import InputMismatch, TooLarge
from shared.messages import Job, Tensor

Arrays = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-job bounds enforced before anything runs."""

    max_rows_per_job: int
    max_elements_per_tensor: int


def prepare_inputs(job: Job, manifest: Manifest, limits: Limits) -> Arrays:
    """The job's tensors as arrays, checked against the model's signature; raises a :class:`JobError`."""
    given = {t.name: t for t in job.inputs}
    expected = {spec.name for spec in manifest.inputs}
    if set(given) != expected:
        # Named columns are inputs of their own: name what is missing or unexpected, not only the sets.
        missing, extra = sorted(expected - set(given)), sorted(set(given) - expected)
        gap = "; ".join(
            part for part in (f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else "") if part
        )
        raise InputMismatch(f"model {manifest.name!r} v{manifest.version} takes inputs {sorted(expected)}: {gap}")
    arrays = {spec.name: _check_tensor(given[spec.name], spec, limits) for spec in manifest.inputs}
    rows = {a.shape[0] for a in arrays.values()}
    if len(rows) > 1:
        raise InputMismatch(f"inputs disagree on the number of rows: {sorted(rows)}")
    if next(iter(rows)) > limits.max_rows_per_job:
        raise TooLarge(f"job has {next(iter(rows))} rows, above the limit of {limits.max_rows_per_job}")
    return arrays


def _check_tensor(tensor: Tensor, spec: TensorSpec, limits: Limits) -> npt.NDArray[Any]:
    elements = math.prod(tensor.shape)
    if elements > limits.max_elements_per_tensor:
        raise TooLarge(
            f"input {tensor.name!r} has {elements} elements, above the limit of {limits.max_elements_per_tensor}"
        )
    if tensor.datatype is not spec.datatype:
        raise InputMismatch(f"input {tensor.name!r} must be {spec.datatype}, job sent {tensor.datatype}")
    if len(tensor.shape) != len(spec.shape) or any(
        want is not None and got != want for got, want in zip(tensor.shape[1:], spec.shape[1:], strict=True)
    ):
        wanted = ["N" if d is None else d for d in spec.shape]
        raise InputMismatch(f"input {tensor.name!r} must have shape {wanted}, job sent {tensor.shape}")
    return tensor.to_numpy()
