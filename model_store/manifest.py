"""The manifest kept beside every model version: what it is, where it came from, how to call it."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Annotated

import onnx
from onnx import helper
from pydantic import BaseModel, ConfigDict, Field

from shared.errors import ModelLoadError
from shared.messages import DATATYPE_OF_NUMPY, Datatype


class TensorSpec(BaseModel):
    """One input or output of the ONNX graph; ``None`` in ``shape`` is a dynamic dimension."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    datatype: Datatype
    shape: list[int | None]


class Manifest(BaseModel):
    """What a published model version is; written last, so a version without one does not exist."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    name: str
    version: Annotated[int, Field(ge=1)]
    sha256: str
    size_bytes: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: dict[str, int]
    framework: dict[str, str]
    source: str
    created_at: datetime


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _datatype(elem_type: int) -> Datatype:
    if elem_type == onnx.TensorProto.STRING:
        return Datatype.BYTES
    return DATATYPE_OF_NUMPY[helper.tensor_dtype_to_np_dtype(elem_type)]


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    return TensorSpec(name=value.name, datatype=_datatype(tensor_type.elem_type), shape=dims)


def build_manifest(name: str, version: int, model_bytes: bytes, source: str, framework: dict[str, str]) -> Manifest:
    """Read the ONNX signature out of ``model_bytes`` and describe the version."""
    try:
        model = onnx.load_model_from_string(model_bytes)
        initializers = {i.name for i in model.graph.initializer}
        inputs = [_spec(v) for v in model.graph.input if v.name not in initializers]
        outputs = [_spec(v) for v in model.graph.output]
    except Exception as exc:  # onnx raises protobuf DecodeError and friends
        raise ModelLoadError(f"not a readable ONNX model: {exc}") from None
    if not inputs:
        raise ModelLoadError("the ONNX graph has no inputs")
    return Manifest(
        name=name,
        version=version,
        sha256=sha256_hex(model_bytes),
        size_bytes=len(model_bytes),
        inputs=inputs,
        outputs=outputs,
        opset={op.domain or "ai.onnx": op.version for op in model.opset_import},
        framework={"onnx": onnx.__version__, **framework},
        source=source,
        created_at=datetime.now(UTC),
    )
