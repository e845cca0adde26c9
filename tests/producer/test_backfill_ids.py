"""A backfill job's id follows its row's content, and a stored result is trusted only when it answers the
job; the rule that ends a wait once nothing can be in flight. Pure logic and a file result store: no broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferq.admin.dead_letters import QueueLook
from inferq.producer.backfill import BackfillPlan, Row, backfill_job, backfill_jobs, read_rows
from inferq.shared.contract.messages import Datatype, ErrorInfo, Result, Status, job_digest
from inferq.shared.errors import ErrorCode
from inferq.shared.results.files import FileResultStore
from inferq.shared.tables.table import Column, Table

TABLE = Table(
    "churn",
    3,
    (
        Column(name="tenure", datatype=Datatype.FP32, input="tenure"),
        Column(name="plan", datatype=Datatype.BYTES, input="plan"),
    ),
    named=True,
)


def _row(line: int, row_id: str | None, tenure: float, given: object = None) -> Row:
    return Row(line, row_id, (tenure, "gold"), given if given is not None else row_id)  # type: ignore[arg-type]


def test_a_rows_job_id_names_model_version_and_row_and_changes_with_its_values() -> None:
    january = backfill_job(TABLE, [_row(2, "C-17", 12.0)], 1)
    february = backfill_job(TABLE, [_row(9, "C-17", 13.0)], 1)  # another line, another value
    again = backfill_job(TABLE, [_row(40, "C-17", 12.0)], 1)  # the same row, moved in the file
    assert january.job.id == f"churn:3:C-17:{january.digest[:16]}"
    assert january.digest == job_digest(january.job)
    assert february.job.id != january.job.id and february.job.id.startswith("churn:3:C-17:")
    assert again.job.id == january.job.id


def test_an_id_that_cannot_be_part_of_a_job_id_gets_a_digest_id_and_keeps_its_value_for_out() -> None:
    for given in ("ana@example.com", "Ana Lima", "x" * 120):
        planned = backfill_job(TABLE, [_row(2, given, 12.0)], 1)
        assert planned.job.id.startswith("bf-") and len(planned.job.id) == 43
        assert planned.keys == [given]
    other = backfill_job(TABLE, [_row(2, "Ana Lima", 12.5)], 1)
    assert other.job.id != backfill_job(TABLE, [_row(2, "Ana Lima", 12.0)], 1).job.id


def test_jsonl_ids_are_written_as_given_and_csv_ids_as_text(tmp_path: Path) -> None:
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"id": 17, "tenure": 3, "plan": "gold"}\n{"id": "017", "tenure": 3, "plan": "gold"}\n')
    rows = list(read_rows(jsonl, TABLE, "id"))
    assert [row.key for row in rows] == [17, "017"]
    csv_file = tmp_path / "rows.csv"
    csv_file.write_text("id,tenure,plan\n017,3,gold\n")
    assert [row.key for row in read_rows(csv_file, TABLE, "id")] == ["017"]


def test_a_stored_result_is_skipped_only_when_it_answers_the_job(tmp_path: Path) -> None:
    # Given three rows: one finished, one whose id holds another job's result, one dead-lettered
    rows = [_row(2, "a", 1.0), _row(3, "b", 2.0), _row(4, "c", 3.0), _row(5, "d", 4.0)]
    jobs = [backfill_job(TABLE, [row], 1) for row in rows]
    store = FileResultStore(tmp_path / "results", fsync=False)

    def result(job_id: str, digest: str) -> Result:
        error = ErrorInfo(code=ErrorCode.INFERENCE_ERROR, message="x")
        return Result(
            id=job_id,
            model="churn",
            requested_version=3,
            job_sha256=digest,
            status=Status.FAILED,
            error=error,
            worker="w",
        )

    store.put_many([result(jobs[0].job.id, jobs[0].digest), result(jobs[1].job.id, "0" * 64)])
    plan = BackfillPlan()
    # When the backfill runs
    published = backfill_jobs(
        iter(rows), table=TABLE, batch_rows=1, results=store, plan=plan, dead_lettered={jobs[2].job.id}
    )
    # Then only the job whose result is its own is skipped, the dead-lettered one is not published again
    assert [job.id for job in published] == [jobs[1].job.id, jobs[3].job.id]
    assert (plan.jobs, plan.skipped_jobs, plan.dead_lettered_jobs) == (2, 1, 1)


@pytest.mark.parametrize(
    ("looks", "settled"),
    [
        ([(True, 0), (True, 10)], False),
        ([(True, 0), (True, 29), (True, 30)], True),
        ([(True, 0), (False, 20), (True, 25), (True, 50)], False),
        ([(True, 0), (False, 20), (True, 25), (True, 55)], True),
    ],
)
def test_nothing_is_in_flight_once_the_queues_looked_empty_for_the_whole_quiet_time(
    looks: list[tuple[bool, float]], settled: bool
) -> None:
    rule = QueueLook(quiet_s=30)
    answers = [rule.saw(empty, now) for empty, now in looks]
    assert answers[-1] is settled and not any(answers[:-1])
