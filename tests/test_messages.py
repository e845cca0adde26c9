"""The wire contract: decoding at the edge, without I/O."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from support import dumps, job_dict

from inferq.shared.contract.codec import Rejected, Undecodable, decode_job
from inferq.shared.contract.messages import ErrorInfo, Job, Result, Status, Tensor
from inferq.shared.errors import ErrorCode, InvalidPayload

LIMIT = 1024 * 1024


def test_a_valid_job_decodes_to_a_typed_job() -> None:
    job = decode_job(dumps(job_dict(id="job-1", version=3, deadline="2026-11-24T10:00:00Z")), None, LIMIT)
    assert isinstance(job, Job)
    assert (job.id, job.model, job.version, job.rows) == ("job-1", "iris", 3, 1)
    assert job.deadline is not None and job.deadline.tzinfo is not None


@pytest.mark.parametrize(("given", "expected"), [(3, 3), ("3", 3), ("latest", "latest"), ("champion", "champion")])
def test_version_is_a_positive_integer_latest_or_an_alias(given: object, expected: object) -> None:
    job = decode_job(dumps(job_dict(version=given)), None, LIMIT)
    assert isinstance(job, Job) and job.version == expected


@pytest.mark.parametrize("version", [0, -1, True, "../x", "", 1.5, None])
def test_a_bad_version_is_rejected_with_the_id_kept(version: object) -> None:
    decoded = decode_job(dumps(job_dict(id="v-bad", version=version)), None, LIMIT)
    assert isinstance(decoded, Rejected) and decoded.job_id == "v-bad"
    assert decoded.error.code is ErrorCode.INVALID_PAYLOAD


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"inputs": [{"name": "X", "shape": [2, 4], "datatype": "FP32", "data": [1, 2, 3]}]}, "holds 8 elements"),
        ({"inputs": [{"name": "X", "shape": [1, 1], "datatype": "FP99", "data": [1]}]}, "datatype"),
        ({"inputs": [{"name": "X", "shape": [-1, 4], "datatype": "FP32", "data": []}]}, "shape"),
        ({"inputs": []}, "inputs"),
        ({"model": "../etc"}, "model"),
        ({"model": "a/b"}, "model"),
        ({"extra": 1}, "extra"),
    ],
)
def test_a_malformed_job_with_a_readable_id_is_rejected_naming_the_problem(change: dict, fragment: str) -> None:
    decoded = decode_job(dumps(job_dict(id="bad-1", **change)), None, LIMIT)
    assert isinstance(decoded, Rejected)
    assert decoded.job_id == "bad-1"
    assert fragment in str(decoded.error)


def test_nan_is_rejected_even_though_strict_json_cannot_carry_it() -> None:
    body = b'{"id":"nan-1","model":"iris","inputs":[{"name":"X","shape":[1,2],"datatype":"FP32","data":[1,NaN]}]}'
    decoded = decode_job(body, None, LIMIT)
    assert isinstance(decoded, Rejected) and decoded.job_id == "nan-1"
    assert "finite" in str(decoded.error)


@pytest.mark.parametrize(
    "body", [b"not json", b"[1,2]", b"{}", dumps(job_dict(id="has space")), dumps(job_dict(id="x" * 129))]
)
def test_a_message_without_a_readable_id_is_undecodable(body: bytes) -> None:
    decoded = decode_job(body, None, LIMIT)
    assert isinstance(decoded, Undecodable)
    assert decoded.reason.startswith("invalid_payload")


def test_the_amqp_message_id_names_a_job_whose_body_is_unreadable() -> None:
    decoded = decode_job(b"\xff\xfe garbage", "msg-7", LIMIT)
    assert isinstance(decoded, Rejected) and decoded.job_id == "msg-7"


def test_an_oversized_message_is_too_large_with_or_without_an_id() -> None:
    big = dumps(job_dict(id="big-1")) + b" " * 2000
    rejected = decode_job(big, "big-1", 1024)
    assert isinstance(rejected, Rejected) and rejected.error.code is ErrorCode.TOO_LARGE
    assert isinstance(decode_job(big, None, 1024), Undecodable)


def test_deeply_nested_json_is_a_value_not_a_crash() -> None:
    body = b'{"id":"deep","model":"iris","parameters":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    decoded = decode_job(body, None, 10 * LIMIT)
    assert isinstance(decoded, Rejected | Undecodable)


def test_tensor_to_numpy_uses_the_declared_datatype() -> None:
    tensor = Tensor(name="X", shape=[2, 2], datatype="INT64", data=[1, 2, 3, 4])
    array = tensor.to_numpy()
    assert array.dtype == np.int64 and array.shape == (2, 2)


def test_strings_in_a_numeric_tensor_are_an_invalid_payload() -> None:
    tensor = Tensor(name="X", shape=[1, 2], datatype="FP32", data=[1.0, "2"])
    with pytest.raises(InvalidPayload, match="found a string"):
        tensor.to_numpy()


def test_output_tensors_round_trip_through_json() -> None:
    array = np.array([[0.25, 0.75]], dtype=np.float32)
    tensor = Tensor.from_numpy("probabilities", array)
    again = Tensor.model_validate_json(tensor.model_dump_json())
    assert again.datatype == "FP32" and again.shape == [1, 2]
    np.testing.assert_allclose(again.to_numpy(), array)


def test_a_result_must_be_consistent_with_its_status() -> None:
    with pytest.raises(ValidationError):
        Result(id="r", model="iris", requested_version=1, status=Status.FAILED, worker="w")
    with pytest.raises(ValidationError):
        Result(id="r", model="iris", requested_version=1, status=Status.SUCCEEDED, worker="w")
    failed = Result(
        id="r",
        model=None,
        requested_version=None,
        status=Status.FAILED,
        error=ErrorInfo(code=ErrorCode.UNKNOWN_MODEL, message="no"),
        worker="w",
    )
    assert Result.model_validate_json(failed.to_json()) == failed
