"""A block of rows held as columns: what a columnar reader yields and what a job of many rows is built from.

Numbers and booleans are numpy arrays of the type the wire carries (FP columns as float64, the value the
file holds, cast to the model's type by the worker exactly as scikit-learn casts a DataFrame; integer
columns as int64, range-checked for theirs), strings are object arrays. Jobs take consecutive rows of
the file whatever its blocks: :func:`reblock` cuts and joins blocks into blocks of exactly ``rows`` rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Cell = bool | int | float | str
ColumnData = npt.NDArray[Any]


@dataclass(frozen=True, slots=True)
class Block:
    """Consecutive rows of a file: ``start`` is the index of the first (0 for the file's first data row),
    ``ids`` the rows' ids as the file gives them (``None`` without an id column), ``columns`` one array
    per column the model reads, in the table's column order."""

    start: int
    ids: ColumnData | None
    columns: tuple[ColumnData, ...]

    @property
    def rows(self) -> int:
        """How many rows the block holds."""
        if self.columns:
            return len(self.columns[0])
        return 0 if self.ids is None else len(self.ids)

    def cut(self, begin: int, end: int) -> Block:
        """Rows ``begin`` to ``end`` (exclusive) of this block, as a block of their own (views, no copy)."""
        ids = None if self.ids is None else self.ids[begin:end]
        return Block(self.start + begin, ids, tuple(column[begin:end] for column in self.columns))

    def id_texts(self) -> list[str]:
        """The ids as text (what job ids and the duplicate check use): ``17`` and ``"17"`` are one id."""
        if self.ids is None:
            return []
        return [value if value.__class__ is str else str(value) for value in self.ids.tolist()]


def joined(blocks: Sequence[Block]) -> Block:
    """Consecutive ``blocks`` as one block."""
    if len(blocks) == 1:
        return blocks[0]
    first = blocks[0]
    ids = None if first.ids is None else np.concatenate([b.ids for b in blocks if b.ids is not None])
    columns = tuple(np.concatenate(parts) for parts in zip(*(b.columns for b in blocks), strict=True))
    return Block(first.start, ids, columns)


def reblock(blocks: Iterable[Block], rows: int) -> Iterator[Block]:
    """``blocks`` cut and joined into blocks of exactly ``rows`` rows (the last may be shorter): where a
    job starts and ends depends on the rows alone, never on how the file was read."""
    pending: list[Block] = []
    held = 0
    for block in blocks:
        offset = 0
        while offset < block.rows:
            take = min(rows - held, block.rows - offset)
            pending.append(block.cut(offset, offset + take))
            held += take
            offset += take
            if held == rows:
                yield joined(pending)
                pending, held = [], 0
    if pending:
        yield joined(pending)
