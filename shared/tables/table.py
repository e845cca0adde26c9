"""Tables as users have them, turned into the tensors a model takes.

A model published from a scikit-learn pipeline over named columns records those columns in its
manifest: each column's name, the type the model needs, and the ONNX input it feeds (one input per
column, the way KServe sends a table, or several columns side by side in one 2-D input). A model
without names takes rows by position in its one 2-D input. The wire contract stays Open Inference
Protocol tensors; this module is what turns rows of values, or a mapping of columns, into them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, StringConstraints

from inferq.shared.contract.messages import NUMPY_DTYPES, Datatype, Tensor
from inferq.shared.errors import InvalidPayload

Cell = bool | int | float | str
Record = Mapping[str, Any] | Sequence[Any]
"""One row: values by column name, or in the table's column order."""

_FLOATS = frozenset({Datatype.FP16, Datatype.FP32, Datatype.FP64})
_INTEGERS = frozenset(
    {
        Datatype.INT8,
        Datatype.INT16,
        Datatype.INT32,
        Datatype.INT64,
        Datatype.UINT8,
        Datatype.UINT16,
        Datatype.UINT32,
        Datatype.UINT64,
    }
)
_BOOLEANS = {"true": True, "false": False, "1": True, "0": False}


class Column(BaseModel):
    """One named column of the table a model reads: the type the model needs and the ONNX input it feeds.

    Columns that feed the same input sit side by side on its second axis, in the order they are listed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    datatype: Datatype
    input: Annotated[str, StringConstraints(min_length=1, max_length=256)]


class InputLike(Protocol):
    """What a table needs to know of a model input (a manifest's ``TensorSpec`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def datatype(self) -> Datatype: ...

    @property
    def shape(self) -> list[int | None]: ...


class RowError(InvalidPayload):
    """A row that cannot feed the model: a missing column, or a value that does not fit its type.

    ``row`` is the row's index in what was given, ``column`` the column's quoted name or 1-based position
    (``None`` when the whole row is at fault); the message names both."""

    def __init__(self, row: int, column: str | None, problem: str) -> None:
        self.row = row
        self.column = column
        self.problem = problem
        self.detail = f"column {column}: {problem}" if column is not None else problem
        super().__init__(f"row {row + 1}: {self.detail}")


def convert(value: Any, datatype: Datatype) -> Cell:
    """``value`` as the model's ``datatype`` needs it; raises ``ValueError`` saying what does not fit.

    Text is read as the type (a CSV cell ``"61"`` feeds a number); a number feeding a string input is
    sent as its text; a number with a fraction never becomes an integer, and NaN or infinity never
    passes (the wire contract has no such numbers)."""
    return converter(datatype)(value)


Converter = Callable[[Any], Cell]


def converter(datatype: Datatype) -> Converter:
    """The function that reads one value as ``datatype`` (chosen once per column, not per value)."""
    if datatype is Datatype.BYTES:
        return _text
    if datatype is Datatype.BOOL:
        return _boolean
    if datatype in _INTEGERS:
        limits = np.iinfo(NUMPY_DTYPES[datatype])
        return partial(_integer, low=int(limits.min), high=int(limits.max), datatype=datatype)
    return _float


def _missing(value: Any) -> None:
    if value is None:
        raise ValueError("no value")


def _text(value: Any) -> str:
    if value.__class__ is str:
        return value
    _missing(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{value!r} is not a string")
    return str(value)


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    _missing(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _BOOLEANS:
        return _BOOLEANS[value.strip().lower()]
    raise ValueError(f"{value!r} is not a boolean")


def _float(value: Any) -> float:
    kind = value.__class__
    if kind is not float and kind is not str and kind is not int:  # bool, None, lists... (bool is not int here)
        _missing(value)
        raise ValueError(f"{value!r} is not a number")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


def _integer(value: Any, *, low: int, high: int, datatype: Datatype) -> int:
    if value.__class__ is int:
        number = value
    else:
        number_f = _float(value.strip() if isinstance(value, str) else value)
        if not number_f.is_integer():
            raise ValueError(f"{value!r} is not an integer")
        number = int(number_f)
    if not low <= number <= high:
        raise ValueError(f"{value!r} is out of range for {datatype}")
    return number


@dataclass(frozen=True, slots=True)
class Table:
    """How rows become the input tensors of one model version: by column name when the model records
    names, else by position in its one 2-D input (``columns`` then has one unnamed entry per position,
    or none at all when that input takes any width)."""

    model: str
    version: int
    columns: tuple[Column, ...]
    named: bool
    any_width: Column | None = None  # a positional input of dynamic width: its name and datatype
    # Worked out once, used for every row: each column's converter, and each input's columns.
    _converters: tuple[Converter, ...] = field(init=False, repr=False, compare=False)
    _inputs: tuple[tuple[str, Datatype, tuple[int, ...]], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_converters", tuple(converter(c.datatype) for c in self.columns))
        grouped: dict[str, list[int]] = {}
        for index, column in enumerate(self.columns):
            grouped.setdefault(column.input, []).append(index)
        inputs = tuple((name, self.columns[idx[0]].datatype, tuple(idx)) for name, idx in grouped.items())
        object.__setattr__(self, "_inputs", inputs)

    @classmethod
    def of(cls, model: str, version: int, columns: Sequence[Column] | None, inputs: Sequence[InputLike]) -> Table:
        """The table of a model version from its manifest's ``columns`` and ``inputs``; raises
        :class:`InvalidPayload` for a model that takes neither named columns nor one 2-D input."""
        if columns:
            return cls(model, version, tuple(columns), named=True)
        if len(inputs) != 1 or len(inputs[0].shape) != 2:
            raise InvalidPayload(
                f"model {model!r} version {version} does not take one 2-D input and names no columns; "
                "send KServe tensors instead"
            )
        spec = inputs[0]
        width = spec.shape[1]
        if width is None:
            open_width = Column(name="1", datatype=spec.datatype, input=spec.name)
            return cls(model, version, (), named=False, any_width=open_width)
        positions = tuple(Column(name=str(i + 1), datatype=spec.datatype, input=spec.name) for i in range(width))
        return cls(model, version, positions, named=False)

    def describe(self) -> str:
        """The columns, for messages: ``city, age, income`` or ``4 values by position``."""
        if self.named:
            return ", ".join(c.name for c in self.columns)
        return "values by position" if self.any_width else f"{len(self.columns)} values by position"

    def label(self) -> str:
        """``model 'churn' version 3``, for messages."""
        return f"model {self.model!r} version {self.version}"

    def values(self, record: Record, row: int = 0) -> tuple[Cell, ...]:
        """One row's values, typed and in column order; extra names are ignored. Raises :class:`RowError`."""
        if isinstance(record, Mapping):
            if not self.named:
                return self._positional(list(record.values()), row)
            try:  # the common case in one pass; a row at fault is read again, cell by cell, to say why
                return tuple([read(record[c.name]) for c, read in zip(self.columns, self._converters, strict=True)])
            except (KeyError, ValueError):
                pass
            absent = next((c for c in self.columns if c.name not in record), None)
            if absent is not None:
                raise RowError(row, repr(absent.name), f"missing ({self.label()} reads {self.describe()})")
            return tuple(self._cell(record[c.name], c, row, repr(c.name)) for c in self.columns)
        if isinstance(record, str | bytes) or not isinstance(record, Sequence):
            raise RowError(row, None, f"expected an object or an array of values, found {type(record).__name__}")
        return self._positional(list(record), row)

    def _positional(self, items: list[Any], row: int) -> tuple[Cell, ...]:
        if self.any_width is not None:
            return tuple(self._cell(v, self.any_width, row, str(i + 1)) for i, v in enumerate(items))
        if len(items) != len(self.columns):
            names = f" ({self.describe()})" if self.named else ""
            count = f"{len(items)} value" + ("" if len(items) == 1 else "s")
            raise RowError(row, None, f"{count}, {self.label()} takes {len(self.columns)}{names}")
        try:
            return tuple([read(v) for v, read in zip(items, self._converters, strict=True)])
        except ValueError:
            pairs = enumerate(zip(items, self.columns, strict=True))
            return tuple(self._cell(v, c, row, str(i + 1)) for i, (v, c) in pairs)

    def _cell(self, value: Any, column: Column, row: int, label: str) -> Cell:
        try:
            return convert(value, column.datatype)
        except ValueError as exc:
            raise RowError(row, label, f"{exc} ({column.datatype} needed)") from None

    def tensors(self, rows: Sequence[Sequence[Cell]]) -> list[Tensor]:
        """Input tensors for rows already converted by :meth:`values` (one tensor per model input)."""
        if not rows:
            raise InvalidPayload("no rows")
        if self.any_width is not None:
            width = len(rows[0])
            if any(len(r) != width for r in rows):
                raise InvalidPayload(f"rows of different widths: {sorted({len(r) for r in rows})}")
            flat: list[Cell] = [v for r in rows for v in r]
            spec = self.any_width
            return [_tensor(spec.input, [len(rows), width], spec.datatype, flat)]
        tensors = []
        for name, datatype, indexes in self._inputs:
            if len(indexes) == 1:
                index = indexes[0]
                data: list[Cell] = [r[index] for r in rows]
            else:
                data = [r[i] for r in rows for i in indexes]
            tensors.append(_tensor(name, [len(rows), len(indexes)], datatype, data))
        return tensors

    def rows_to_tensors(self, rows: Sequence[Record]) -> list[Tensor]:
        """Input tensors for ``rows`` (objects by column name, or arrays in column order)."""
        return self.tensors([self.values(record, index) for index, record in enumerate(rows)])

    def columns_to_tensors(self, columns: Mapping[str, Sequence[Any]]) -> list[Tensor]:
        """Input tensors for a mapping of column name → values (all of one length; extra names ignored)."""
        if not self.named:
            raise InvalidPayload(f"{self.label()} names no columns: send rows by position")
        missing = [c.name for c in self.columns if c.name not in columns]
        if missing:
            raise RowError(0, repr(missing[0]), f"missing ({self.label()} reads {self.describe()})")
        lengths = {len(columns[c.name]) for c in self.columns}
        if len(lengths) != 1:
            raise InvalidPayload(f"columns of different lengths: {sorted(lengths)}")
        count = lengths.pop()
        rows = [{c.name: columns[c.name][i] for c in self.columns} for i in range(count)]
        return self.rows_to_tensors(rows)


def _tensor(name: str, shape: list[int], datatype: Datatype, data: list[Cell]) -> Tensor:
    """A tensor of values :meth:`Table.values` typed, and of a shape built to fit them: validating it
    again would only cost time (the worker still decodes and checks every job it receives)."""
    return Tensor.model_construct(name=name, shape=shape, datatype=datatype, data=data)
