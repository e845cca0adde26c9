"""A backfill job's id follows its rows' content, and a stored result is trusted only when it answers the
job; the rule that ends a wait once nothing can be in flight. Pure logic and a file result store: no broker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inferq.admin.dead_letters import QueueLook
from inferq.producer.backfill import (
    BackfillPlan,
    PlannedJob,
    backfill_jobs,
    job_keys,
    plan_job,
    planned_jobs,
    rows_per_job,
)
from inferq.shared.contract.messages import Datatype, ErrorInfo, Job, Result, Status, job_digest
from inferq.shared.errors import ErrorCode
from inferq.shared.results.files import FileResultStore
from inferq.shared.tables.block import Block
from inferq.shared.tables.columnar import read_blocks
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


def _block(start: int, ids: list[object] | None, tenures: list[float]) -> Block:
    id_array = None if ids is None else np.array(ids, dtype=object)
    plans = np.array(["gold"] * len(tenures), dtype=object)
    return Block(start, id_array, (np.array(tenures, dtype=np.float64), plans))


def _job(block: Block, batch_rows: int = 1) -> tuple[PlannedJob, Job]:
    planned = plan_job(TABLE, block, batch_rows)
    return planned, Job.model_validate_json(planned.body)


def test_a_rows_job_id_names_model_version_and_row_and_changes_with_its_values() -> None:
    january, job = _job(_block(0, ["C-17"], [12.0]))
    february, _ = _job(_block(7, ["C-17"], [13.0]))  # another line, another value
    again, _ = _job(_block(38, ["C-17"], [12.0]))  # the same row, moved in the file
    assert january.job_id == f"churn:3:C-17:{january.digest[:16]}"
    assert january.digest == job_digest(job)  # what the worker computes from the body it decodes
    assert february.job_id != january.job_id and february.job_id.startswith("churn:3:C-17:")
    assert again.job_id == january.job_id


def test_a_jobs_digest_is_the_workers_for_any_float_the_file_holds() -> None:
    rng = np.random.default_rng(3)
    tenures = [*rng.normal(0, 1e-6, 200), *rng.normal(0, 1e12, 200), 5e-324, 1e22, -0.0, 0.1, 123456789.123]
    planned, job = _job(_block(0, None, [float(t) for t in tenures]), batch_rows=512)
    assert planned.digest == job_digest(job) and planned.job_id.startswith("bf-")
    assert job.inputs[0].data == tenures  # the values themselves, not their float32 rounding


def test_an_id_that_cannot_be_part_of_a_job_id_gets_a_digest_id_and_keeps_its_value_for_out() -> None:
    for given in ("ana@example.com", "Ana Lima", "x" * 120):
        planned, _ = _job(_block(0, [given], [12.0]))
        assert planned.job_id.startswith("bf-") and len(planned.job_id) == 43
        assert job_keys(_block(0, [given], [12.0]), 2) == [given]
    other, _ = _job(_block(0, ["Ana Lima"], [12.5]))
    assert other.job_id != _job(_block(0, ["Ana Lima"], [12.0]))[0].job_id


def test_jsonl_ids_are_written_as_given_and_csv_ids_as_text(tmp_path: Path) -> None:
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"id": 17, "tenure": 3, "plan": "gold"}\n{"id": "017", "tenure": 3, "plan": "gold"}\n')
    assert [key for block in read_blocks(jsonl, TABLE, "id") for key in job_keys(block, 1)] == [17, "017"]
    csv_file = tmp_path / "rows.csv"
    csv_file.write_text("id,tenure,plan\n017,3,gold\n")
    assert [key for block in read_blocks(csv_file, TABLE, "id") for key in job_keys(block, 2)] == ["017"]


def test_jobs_take_consecutive_rows_whatever_the_blocks_the_file_was_read_in() -> None:
    whole = [_block(0, None, [float(i) for i in range(10)])]
    pieces = [_block(0, None, [0.0, 1.0, 2.0]), _block(3, None, [float(i) for i in range(3, 10)])]
    assert [p.job_id for p in planned_jobs(whole, TABLE, 4)] == [p.job_id for p in planned_jobs(pieces, TABLE, 4)]
    assert [p.rows for p in planned_jobs(pieces, TABLE, 4)] == [4, 4, 2]


def test_a_stored_result_is_skipped_only_when_it_answers_the_job(tmp_path: Path) -> None:
    # Given four rows: one finished, one whose id holds another job's result, one dead-lettered
    blocks = [_block(i, [key], [float(i)]) for i, key in enumerate("abcd")]
    jobs = [plan_job(TABLE, block, 1) for block in blocks]
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

    store.put_many([result(jobs[0].job_id, jobs[0].digest), result(jobs[1].job_id, "0" * 64)])
    plan = BackfillPlan()
    # When the backfill runs
    published = backfill_jobs(
        iter(blocks), table=TABLE, batch_rows=1, results=store, plan=plan, dead_lettered={jobs[2].job_id}
    )
    # Then only the job whose result is its own is skipped, the dead-lettered one is not published again
    assert [job.job_id for job in published] == [jobs[1].job_id, jobs[3].job_id]
    assert (plan.jobs, plan.skipped_jobs, plan.dead_lettered_jobs) == (2, 1, 1)


def test_rows_per_job_make_a_few_hundred_kilobytes_and_depend_on_the_model_alone() -> None:
    assert rows_per_job(TABLE, 1024 * 1024) == 4096  # a string and a number: ~44 bytes a row
    assert rows_per_job(TABLE, 64 * 1024) == 256  # a quarter of a small message limit


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
