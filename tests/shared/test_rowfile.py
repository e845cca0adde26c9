"""Row files (CSV with a header, JSONL) are read with line numbers; every problem is one line naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferq.shared.tables.rowfile import RowFileError, csv_header, read_records


def test_csv_rows_come_as_objects_by_header_with_their_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_bytes("\ufeffcity,age\nrome,61\n\noslo,\n".encode())  # a byte-order mark, a blank line, a short row
    records = list(read_records(path))
    assert [(r.line, r.values) for r in records] == [
        (2, {"city": "rome", "age": "61"}),
        (4, {"city": "oslo", "age": ""}),
    ]
    assert csv_header(path) == ["city", "age"]


def test_a_csv_row_longer_than_its_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("a,b\n1,2\n1,2,3\n")
    with pytest.raises(RowFileError, match=r"rows.csv:3: 3 cells, the header names 2"):
        list(read_records(path))


@pytest.mark.parametrize("name", ["rows.csv", "rows.jsonl"])
def test_a_file_that_is_not_utf8_names_the_file_and_line(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    first = b"city,age\n" if name.endswith(".csv") else b'{"city": "rome"}\n'
    path.write_bytes(first + '"m\u00fcnchen",3\n'.encode("latin-1"))
    with pytest.raises(RowFileError) as caught:
        list(read_records(path))
    assert str(caught.value) == f"{path}:2: not UTF-8 text (save the file as UTF-8)"


def test_jsonl_lines_are_objects_or_arrays(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n[1, 2]\n3\n')
    records = read_records(path)
    assert [next(records).values, next(records).values] == [{"a": 1}, [1, 2]]
    with pytest.raises(RowFileError, match=r"rows.jsonl:4: expected an object or an array, found int"):
        next(records)


def test_only_csv_and_jsonl_files_are_read(tmp_path: Path) -> None:
    with pytest.raises(RowFileError, match=r"expected a .csv or .jsonl file"):
        list(read_records(tmp_path / "rows.parquet"))
