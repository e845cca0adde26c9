"""The binary tensor data extension of the Open Inference Protocol (KServe V2, as Triton speaks it): a
request or answer is JSON, then the raw bytes of some tensors, with ``Inference-Header-Content-Length``
giving the JSON's length.

A request's binary inputs (``parameters.binary_data_size`` instead of ``data``, their bytes in input
order) become plain tensors here: the job a worker gets is the same JSON whichever way the caller sent
it. Outputs go back as bytes when asked (``binary_data`` on a requested output, ``binary_data_output`` on
the request for the rest); those parameters say how to answer, not what to compute, so they are taken
out of the request before it becomes a job (and before two requests under one id are compared).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from inferq.gateway.errors import bad_request, describe_validation
from inferq.gateway.protocol import (
    BINARY_DATA,
    BINARY_DATA_OUTPUT,
    BINARY_DATA_SIZE,
    BinaryOutputTensor,
    InferenceRequest,
    InferenceResponse,
    InputTensor,
    RequestedOutput,
)
from inferq.shared.contract.messages import FLOAT_DATATYPES, NUMPY_DTYPES, Datatype, OutputTensor

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_MEDIA_TYPE = "application/octet-stream"
_LENGTH = struct.Struct("<I")
"""A BYTES element in binary: its length, 4 bytes little-endian, then its bytes."""
_UNSUPPORTED_OUTPUT_PARAMETERS = ("classification", "shared_memory_region")


@dataclass(frozen=True, slots=True)
class OutputEncoding:
    """Which outputs of a synchronous answer go as bytes after the JSON."""

    binary_by_default: bool = False
    binary: frozenset[str] = frozenset()
    as_json: frozenset[str] = frozenset()

    def is_binary(self, name: str) -> bool:
        """True when output ``name`` goes as bytes."""
        if name in self.binary:
            return True
        return self.binary_by_default and name not in self.as_json

    @property
    def any_binary(self) -> bool:
        """True when some output may go as bytes."""
        return self.binary_by_default or bool(self.binary)


JSON_ONLY = OutputEncoding()


# -- requests --------------------------------------------------------------------------------------


def read_request(body: bytes, header_length: str | None) -> tuple[InferenceRequest, OutputEncoding]:
    """The inference request in ``body`` (JSON, then binary inputs when ``header_length`` is given) and
    how to encode its answer; raises a 400 ``ApiError`` naming what is wrong."""
    json_part, binary = _split(body, header_length)
    try:
        request = InferenceRequest.model_validate_json(json_part)
    except ValidationError as exc:
        raise bad_request(describe_validation(exc.errors())) from None
    request = _with_binary_inputs(request, binary)
    return _without_encoding(request)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    length = header_length.strip()
    if not (length.isascii() and length.isdigit()) or int(length) > len(body):
        raise bad_request(
            f"{HEADER_LENGTH} must be the length in bytes of the JSON at the start of the body "
            f"(0 to {len(body)}), not {header_length[:32]!r}"
        )
    split = int(length)
    return body[:split], memoryview(body)[split:]


def _with_binary_inputs(request: InferenceRequest, binary: memoryview) -> InferenceRequest:
    """``request`` with each binary input's bytes read into its ``data``, in input order."""
    if not binary and all(tensor.data is not None for tensor in request.inputs):
        return request  # the usual JSON request: nothing to copy
    offset = 0
    inputs: list[InputTensor] = []
    for tensor in request.inputs:
        if tensor.data is not None:
            inputs.append(tensor)
            continue
        size = _binary_size(tensor, len(binary) - offset)
        data = decode_tensor(tensor.name, tensor.datatype, tensor.shape, binary[offset : offset + size])
        offset += size
        parameters = {k: v for k, v in tensor.parameters.items() if k != BINARY_DATA_SIZE}
        inputs.append(tensor.model_copy(update={"data": data, "parameters": parameters}))
    if offset != len(binary):
        raise bad_request(f"{len(binary) - offset} bytes of binary data follow the last binary input")
    return request.model_copy(update={"inputs": inputs})


def _binary_size(tensor: InputTensor, left: int) -> int:
    size = tensor.parameters.get(BINARY_DATA_SIZE)
    if size is None:
        raise bad_request(f"input {tensor.name!r} has neither data nor parameters.{BINARY_DATA_SIZE}")
    if type(size) is not int or size < 0:
        raise bad_request(f"input {tensor.name!r}: parameters.{BINARY_DATA_SIZE} must be a count of bytes")
    if size > left:
        raise bad_request(
            f"input {tensor.name!r} has {size} bytes of binary data but only {left} follow "
            f"(the JSON's length goes in {HEADER_LENGTH})"
        )
    return size


def decode_tensor(name: str, datatype: Datatype, shape: list[int], raw: memoryview) -> list[Any]:
    """The flat data of a tensor sent as bytes (little-endian, row-major; BYTES length-prefixed), held
    to the JSON path's rules: the element count of ``shape``, finite floats, UTF-8 strings."""
    count = math.prod(shape)
    if datatype is Datatype.BYTES:
        return _decode_strings(name, raw, count)
    dtype = np.dtype(np.uint8 if datatype is Datatype.BOOL else NUMPY_DTYPES[datatype]).newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise bad_request(
            f"input {name!r}: {len(raw)} bytes of binary data, but shape {shape} of {datatype} takes "
            f"{count * dtype.itemsize}"
        )
    array = np.frombuffer(raw, dtype=dtype)
    if datatype is Datatype.BOOL:
        return list((array != 0).tolist())
    if datatype in FLOAT_DATATYPES and not np.isfinite(array).all():
        raise bad_request(f"input {name!r}: NaN and infinity are not allowed")
    return list(array.tolist())


def _decode_strings(name: str, raw: memoryview, count: int) -> list[Any]:
    strings: list[Any] = []
    offset = 0
    try:
        while offset < len(raw):
            (length,) = _LENGTH.unpack_from(raw, offset)
            offset += _LENGTH.size
            if offset + length > len(raw):
                raise ValueError("an element runs past the end")
            strings.append(bytes(raw[offset : offset + length]).decode("utf-8"))
            offset += length
    except (struct.error, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise bad_request(f"input {name!r}: BYTES binary data is not length-prefixed UTF-8 ({exc})") from None
    if len(strings) != count:
        raise bad_request(f"input {name!r}: {len(strings)} BYTES elements in binary data, shape needs {count}")
    return strings


def _without_encoding(request: InferenceRequest) -> tuple[InferenceRequest, OutputEncoding]:
    """``request`` without the parameters that only say how to answer, and what they said."""
    outputs = request.outputs or []
    asks = any(BINARY_DATA in o.parameters for o in outputs) or BINARY_DATA_OUTPUT in request.parameters
    for output in outputs:
        for key in _UNSUPPORTED_OUTPUT_PARAMETERS:
            if key in output.parameters:
                raise bad_request(f"output {output.name!r}: parameters.{key} is not supported")
    if not asks:
        return request, JSON_ONLY
    by_default = _flag(request.parameters.get(BINARY_DATA_OUTPUT, False), f"parameters.{BINARY_DATA_OUTPUT}")
    binary: set[str] = set()
    as_json: set[str] = set()
    kept: list[RequestedOutput] = []
    for output in outputs:
        if BINARY_DATA in output.parameters:
            wanted = _flag(output.parameters[BINARY_DATA], f"output {output.name!r}: parameters.{BINARY_DATA}")
            (binary if wanted else as_json).add(output.name)
        parameters = {k: v for k, v in output.parameters.items() if k != BINARY_DATA}
        kept.append(output.model_copy(update={"parameters": parameters}))
    parameters = {k: v for k, v in request.parameters.items() if k != BINARY_DATA_OUTPUT}
    stripped = request.model_copy(update={"parameters": parameters, "outputs": kept or None})
    return stripped, OutputEncoding(by_default, frozenset(binary), frozenset(as_json))


def _flag(value: object, where: str) -> bool:
    if type(value) is not bool:
        raise bad_request(f"{where} must be true or false")
    return value


# -- answers ---------------------------------------------------------------------------------------


def encode_response(response: InferenceResponse, encoding: OutputEncoding) -> tuple[bytes, int | None]:
    """The body of an inference answer, and the JSON's length when binary outputs follow it (else
    ``None``: the body is all JSON)."""
    if not encoding.any_binary:
        return response.model_dump_json(exclude_none=True).encode(), None
    outputs: list[OutputTensor | BinaryOutputTensor] = []
    chunks: list[bytes] = []
    for output in response.outputs:
        if isinstance(output, OutputTensor) and encoding.is_binary(output.name):
            raw = encode_tensor(output)
            chunks.append(raw)
            output = BinaryOutputTensor.model_construct(  # noqa: PLW2901
                name=output.name, shape=output.shape, datatype=output.datatype, parameters={BINARY_DATA_SIZE: len(raw)}
            )
        outputs.append(output)
    if not chunks:
        return response.model_dump_json(exclude_none=True).encode(), None
    header = response.model_copy(update={"outputs": outputs}).model_dump_json(exclude_none=True).encode()
    return header + b"".join(chunks), len(header)


def encode_tensor(tensor: OutputTensor) -> bytes:
    """A tensor's data as the binary extension sends it: little-endian, row-major; BYTES length-prefixed."""
    if tensor.datatype is Datatype.BYTES:
        encoded = [str(x).encode("utf-8") for x in tensor.data]
        return b"".join(_LENGTH.pack(len(e)) + e for e in encoded)
    dtype = np.dtype(NUMPY_DTYPES[tensor.datatype]).newbyteorder("<")
    return np.asarray(tensor.data, dtype=dtype).tobytes()
