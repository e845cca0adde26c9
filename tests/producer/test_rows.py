"""The Producer's row helpers build jobs of Open Inference Protocol tensors from rows of named columns."""

from __future__ import annotations

import pytest

from inferq.producer import job_from_columns, job_from_rows, jobs_from_rows
from inferq.shared.contract.messages import Datatype
from inferq.shared.tables.table import Column, RowError, Table

TABLE = Table(
    "mixed",
    4,
    (
        Column(name="city", datatype=Datatype.BYTES, input="city"),
        Column(name="age", datatype=Datatype.FP32, input="age"),
    ),
    named=True,
)


def test_a_job_from_rows_runs_the_tables_version_unless_told_otherwise() -> None:
    job = job_from_rows(TABLE, [{"city": "rome", "age": 61}], job_id="order-1")
    assert (job.id, job.model, job.version, [t.name for t in job.inputs]) == ("order-1", "mixed", 4, ["city", "age"])
    assert job_from_rows(TABLE, [["rome", 61]], version="champion").version == "champion"


def test_a_job_from_a_mapping_of_columns_equals_the_job_from_its_rows() -> None:
    by_columns = job_from_columns(TABLE, {"age": [61, 30], "city": ["rome", "oslo"]}, job_id="same")
    by_rows = job_from_rows(TABLE, [{"city": "rome", "age": 61}, {"city": "oslo", "age": 30}], job_id="same")
    assert by_columns == by_rows


def test_jobs_from_rows_group_rows_and_count_them_from_the_start_in_errors() -> None:
    rows = [{"city": "rome", "age": n} for n in range(5)] + [{"city": "oslo", "age": "old"}]
    jobs = jobs_from_rows(TABLE, rows, rows_per_job=2)
    assert [job.rows for job in (next(jobs), next(jobs))] == [2, 2]
    with pytest.raises(RowError, match=r"^row 6: column 'age': 'old' is not a number \(FP32 needed\)$"):
        next(jobs)
