"""Label files without a server: Parquet, renamed columns, and refusals that name the line."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from inferq.monitoring.label_file import LabelFileError, read_labels


def test_a_parquet_file_gives_its_ids_as_text_and_its_labels_as_typed(tmp_path: Path) -> None:
    path = tmp_path / "truth.parquet"
    pq.write_table(pa.table({"customer": ["a", "b", "c"], "y": [1, 0, 1], "other": [0.1, 0.2, 0.3]}), path)

    assert read_labels(path, "customer", "y") == [("a", 1), ("b", 0), ("c", 1)]


def test_the_same_id_twice_with_the_same_label_is_one_label(tmp_path: Path) -> None:
    path = tmp_path / "truth.jsonl"
    path.write_text('{"id": 17, "label": "cat"}\n{"id": "17", "label": "cat"}\n')

    assert read_labels(path) == [("17", "cat")]


def test_a_parquet_file_without_the_label_column_is_refused_naming_what_it_has(tmp_path: Path) -> None:
    path = tmp_path / "truth.parquet"
    pq.write_table(pa.table({"id": ["a"], "y": [1]}), path)

    with pytest.raises(LabelFileError, match=r"no column 'label' \(found 'id', 'y'"):
        read_labels(path)


def test_a_file_of_another_kind_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "truth.xlsx"
    path.write_text("")

    with pytest.raises(LabelFileError, match=r"expected a \.csv or \.jsonl file \(or \.parquet\)"):
        read_labels(path)
