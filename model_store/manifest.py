"""The manifest kept beside every model version: what it is, where it came from, how to call it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from itertools import chain
from pathlib import PurePosixPath
from typing import Annotated

import onnx
from onnx import helper
from pydantic import BaseModel, ConfigDict, Field

from inferq.monitoring.reference import Reference
from inferq.shared.contract.messages import DATATYPE_OF_NUMPY, Datatype
from inferq.shared.errors import ModelLoadError
from inferq.shared.tables.table import Column, Table


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
    # The named columns of the table the model reads, in order (None: rows go by position, if at all).
    columns: list[Column] | None = None
    reference: Reference | None = None
    """Bins and shares of the training inputs and outputs (``publish --reference``): what drift is measured against."""

    def table(self) -> Table:
        """How rows become this version's input tensors; raises :class:`InvalidPayload` when they cannot."""
        return Table.of(self.name, self.version, self.columns, self.inputs)


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def datatype_of_elem(elem_type: int) -> Datatype:
    """The Open Inference Protocol datatype of an ONNX tensor element type."""
    if elem_type == onnx.TensorProto.STRING:
        return Datatype.BYTES
    return DATATYPE_OF_NUMPY[helper.tensor_dtype_to_np_dtype(elem_type)]


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    return TensorSpec(name=value.name, datatype=datatype_of_elem(tensor_type.elem_type), shape=dims)


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in ``graph``: initializers, sparse ones, node attributes, nested subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def _escapes(location: str) -> bool:
    """True when an external-data location would resolve outside the model's own directory."""
    path = PurePosixPath(location.replace("\\", "/"))
    return not location or path.is_absolute() or ":" in location or ".." in path.parts


def check_self_contained(model: onnx.ModelProto) -> None:
    """Refuse external-data references: one that points outside the version's directory is an attempt
    to read another file; any other names a file the store does not keep beside ``model.onnx``."""
    functions = (_node_tensors(f.node) for f in model.functions)
    for tensor in chain(_tensors(model.graph), *functions):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if _escapes(location):
            raise ModelLoadError(
                f"tensor {tensor.name!r} references external data {location!r} outside the version's directory: refused"
            )
        raise ModelLoadError(
            f"tensor {tensor.name!r} keeps its data in an external file {location!r}, which the store "
            "does not hold: save the model with all tensors inline"
        )


def verify_model(manifest: Manifest, data: bytes) -> None:
    """Check ``data`` is the version ``manifest`` describes: size, sha256, and no external data."""
    if len(data) != manifest.size_bytes or sha256_hex(data) != manifest.sha256:
        raise ModelLoadError(
            f"model {manifest.name!r} version {manifest.version}: file does not match its manifest "
            f"({len(data)} bytes, expected {manifest.size_bytes} with sha256 {manifest.sha256[:12]}…)"
        )
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # onnx raises protobuf DecodeError and friends
        raise ModelLoadError(f"model {manifest.name!r} version {manifest.version}: not readable ONNX: {exc}") from None
    check_self_contained(model)


def check_columns(columns: list[Column], inputs: list[TensorSpec]) -> None:
    """Refuse named columns that do not feed the ONNX inputs exactly: every input fed, each by columns
    of its own datatype, as many as its second axis holds."""
    by_input: dict[str, list[Column]] = {}
    for column in columns:
        by_input.setdefault(column.input, []).append(column)
    if len({c.name for c in columns}) != len(columns):
        raise ModelLoadError("two columns share a name")
    specs = {spec.name: spec for spec in inputs}
    if set(by_input) != set(specs):
        raise ModelLoadError(f"columns feed inputs {sorted(by_input)}, the ONNX graph takes {sorted(specs)}")
    for name, fed in by_input.items():
        spec = specs[name]
        if len(spec.shape) != 2 or spec.shape[1] not in (None, len(fed)):
            raise ModelLoadError(f"input {name!r} of shape {spec.shape} cannot take {len(fed)} column(s)")
        wrong = [c.name for c in fed if c.datatype is not spec.datatype]
        if wrong:
            raise ModelLoadError(f"column {wrong[0]!r} is not {spec.datatype}, the type of input {name!r}")


def build_manifest(
    name: str,
    version: int,
    model_bytes: bytes,
    source: str,
    framework: dict[str, str],
    columns: list[Column] | None = None,
) -> Manifest:
    """Read the ONNX signature out of ``model_bytes`` and describe the version (with the table's
    ``columns`` when the model reads named columns)."""
    try:
        model = onnx.load_model_from_string(model_bytes)
        initializers = {i.name for i in model.graph.initializer}
        inputs = [_spec(v) for v in model.graph.input if v.name not in initializers]
        outputs = [_spec(v) for v in model.graph.output]
    except Exception as exc:  # onnx raises protobuf DecodeError and friends
        raise ModelLoadError(f"not a readable ONNX model: {exc}") from None
    if not inputs:
        raise ModelLoadError("the ONNX graph has no inputs")
    check_self_contained(model)
    if columns is not None:
        check_columns(columns, inputs)
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
        columns=columns,
    )
