"""The protocol's pure pieces, without a server: reading a request (JSON, or JSON then binary tensors),
encoding an answer's binary outputs, the ``Prefer`` header, and the status of a job that failed."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest

from inferq.gateway.binary import JSON_ONLY, OutputEncoding, encode_response, read_request
from inferq.gateway.errors import ApiError, failed_job_status
from inferq.gateway.jobs import Preference, preference
from inferq.gateway.protocol import InferenceResponse
from inferq.shared.contract.messages import OutputTensor


def binary_request(header: dict, *tensors: bytes) -> tuple[bytes, str]:
    """A body as tritonclient sends it, and its Inference-Header-Content-Length."""
    encoded = orjson.dumps(header)
    return encoded + b"".join(tensors), str(len(encoded))


def x_input(rows: int = 1, **parameters: object) -> dict:
    return {"name": "X", "shape": [rows, 4], "datatype": "FP32", "parameters": parameters}


def test_a_binary_input_becomes_the_same_tensor_a_json_request_makes() -> None:
    rows = np.array([[5.5, 3.5, 1.25, 0.5]], dtype=np.float32)
    body, length = binary_request({"inputs": [x_input(binary_data_size=16)]}, rows.tobytes())

    request, encoding = read_request(body, length)
    as_json, _ = read_request(orjson.dumps({"inputs": [{**x_input(), "data": rows.ravel().tolist()}]}), None)

    assert request.inputs[0].tensor() == as_json.inputs[0].tensor()
    assert request.inputs[0].parameters == {}  # the extension's parameter is not part of the job
    assert encoding == JSON_ONLY


def test_binary_inputs_of_every_kind_are_read_in_input_order() -> None:
    inputs = [
        {"name": "flag", "shape": [3], "datatype": "BOOL", "parameters": {"binary_data_size": 3}},
        {"name": "json", "shape": [2], "datatype": "INT32", "data": [7, 8]},
        {"name": "count", "shape": [2], "datatype": "INT64", "parameters": {"binary_data_size": 16}},
        {"name": "word", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 13}},
        {"name": "half", "shape": [1], "datatype": "FP16", "parameters": {"binary_data_size": 2}},
    ]
    words = struct.pack("<I", 2) + b"ok" + struct.pack("<I", 3) + "été".encode()[:3]
    assert len(words) == 13
    body, length = binary_request(
        {"inputs": inputs},
        bytes([1, 0, 2]),
        np.array([-1, 2**40], dtype="<i8").tobytes(),
        words,
        np.array([1.5], dtype="<f2").tobytes(),
    )

    request, _ = read_request(body, length)

    data = {t.name: t.data for t in request.inputs}
    assert data == {
        "flag": [True, False, True],
        "json": [7, 8],
        "count": [-1, 2**40],
        "word": ["ok", "ét"],
        "half": [1.5],
    }


@pytest.mark.parametrize(
    ("inputs", "tail", "length", "complaint"),
    [
        ([x_input(binary_data_size=16)], b"\0" * 12, None, "only 12 follow"),
        ([x_input(binary_data_size=12)], b"\0" * 12, None, "takes 16"),
        ([x_input(binary_data_size=16)], b"\0" * 20, None, "4 bytes of binary data follow"),
        ([x_input()], b"", None, "neither data nor parameters.binary_data_size"),
        ([x_input(binary_data_size="16")], b"\0" * 16, None, "count of bytes"),
        ([x_input(binary_data_size=16)], np.array([np.nan, 0, 0, 0], "<f4").tobytes(), None, "NaN"),
        ([{**x_input(binary_data_size=16), "data": [1, 2, 3, 4]}], b"\0" * 16, None, "exclusive"),
        ([x_input(binary_data_size=16)], b"\0" * 16, "999", "Inference-Header-Content-Length"),
        ([x_input(binary_data_size=16)], b"\0" * 16, "-1", "Inference-Header-Content-Length"),
    ],
)
def test_a_binary_body_that_does_not_add_up_is_a_400_naming_the_problem(
    inputs: list[dict], tail: bytes, length: str | None, complaint: str
) -> None:
    body, header_length = binary_request({"inputs": inputs}, tail)
    with pytest.raises(ApiError) as refused:
        read_request(body, length or header_length)
    assert refused.value.status == 400 and refused.value.code == "invalid_payload"
    assert complaint in refused.value.message


def test_bytes_that_are_not_length_prefixed_utf8_are_refused() -> None:
    word = {"name": "w", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 5}}
    body, length = binary_request({"inputs": [word]}, struct.pack("<I", 1) + b"\xff")
    with pytest.raises(ApiError, match="length-prefixed UTF-8"):
        read_request(body, length)


def test_output_encoding_parameters_say_how_to_answer_and_leave_the_job() -> None:
    body = {
        "inputs": [{**x_input(), "data": [1, 2, 3, 4]}],
        "parameters": {"binary_data_output": True, "tenant": "a"},
        "outputs": [{"name": "label", "parameters": {"binary_data": False}}, {"name": "probabilities"}],
    }

    request, encoding = read_request(orjson.dumps(body), None)

    assert request.parameters == {"tenant": "a"}
    assert [o.parameters for o in request.outputs or []] == [{}, {}]
    assert not encoding.is_binary("label") and encoding.is_binary("probabilities")


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ({"parameters": {"binary_data_output": "yes"}}, "true or false"),
        ({"outputs": [{"name": "label", "parameters": {"classification": 2}}]}, "classification is not supported"),
        ({"inputs": []}, "inputs"),
    ],
)
def test_parameters_the_server_cannot_honour_are_refused(body: dict, complaint: str) -> None:
    with pytest.raises(ApiError, match=complaint):
        read_request(orjson.dumps({"inputs": [{**x_input(), "data": [1, 2, 3, 4]}], **body}), None)


def test_a_body_that_is_not_json_is_named_so() -> None:
    with pytest.raises(ApiError, match="not valid JSON"):
        read_request(b"{not json", None)


def response() -> InferenceResponse:
    return InferenceResponse(
        model_name="iris",
        model_version="1",
        id="a",
        outputs=[
            OutputTensor(name="label", shape=[2], datatype="INT64", data=[0, 2]),
            OutputTensor(name="probabilities", shape=[2, 2], datatype="FP32", data=[0.25, float("nan"), 1.0, 0.0]),
            OutputTensor(name="kind", shape=[1], datatype="BYTES", data=["setosa"]),
        ],
    )


def test_binary_outputs_follow_the_json_in_output_order() -> None:
    body, header_length = encode_response(
        response(), OutputEncoding(binary_by_default=True, as_json=frozenset({"label"}))
    )

    assert header_length is not None
    header = orjson.loads(body[:header_length])
    assert header["outputs"][0]["data"] == [0, 2]
    sizes = [o.get("parameters", {}).get("binary_data_size") for o in header["outputs"]]
    assert sizes == [None, 16, 10]
    tail = body[header_length:]
    probabilities = np.frombuffer(tail[:16], dtype="<f4")
    assert probabilities[0] == 0.25 and np.isnan(probabilities[1])
    assert tail[16:] == struct.pack("<I", 6) + b"setosa"


def test_an_answer_without_binary_outputs_is_plain_json_with_non_finite_floats_as_strings() -> None:
    body, header_length = encode_response(response(), JSON_ONLY)
    assert header_length is None
    assert orjson.loads(body)["outputs"][1]["data"] == [0.25, "NaN", 1.0, 0.0]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], Preference()),
        (["wait=5"], Preference(wait_s=5.0)),
        (["respond-async, wait=10"], Preference(respond_async=True, wait_s=10.0)),
        (["Respond-Async"], Preference(respond_async=True)),
        (["wait=2.5;foo"], Preference(wait_s=2.5)),
        (["handling=lenient", "respond-async"], Preference(respond_async=True)),
        (["wait=abc"], Preference()),
        (["nowait=5"], Preference()),
    ],
)
def test_prefer_is_read_as_rfc_7240_says(headers: list[str], expected: Preference) -> None:
    assert preference(headers) == expected


def test_the_wait_is_the_default_unless_prefer_says_and_never_above_the_cap() -> None:
    assert Preference().wait(30, 60) == 30
    assert Preference(respond_async=True).wait(30, 60) == 0
    assert Preference(respond_async=True, wait_s=5).wait(30, 60) == 5
    assert Preference(wait_s=600).wait(30, 60) == 60
    assert Preference().wait(30, 10) == 10


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("invalid_payload", 400),
        ("input_mismatch", 400),
        ("too_large", 400),
        ("unknown_model", 404),
        ("unknown_version", 404),
        ("id_conflict", 409),
        ("inference_error", 500),
        ("model_load_error", 500),
        ("dead_lettered", 500),
        ("expired", 500),
    ],
)
def test_a_failed_job_answers_with_the_status_of_whose_fault_it_was(code: str, status: int) -> None:
    assert failed_job_status(code) == status
