"""``inferq submit`` against a full jobs queue: thousands of refused publishes, then a worker drains the
queue. Every id is printed, queued and gets a result, and the exit code tells the truth."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from support import BackgroundWorker, Env, dumps, job_dict, wait_for

pytestmark = pytest.mark.broker

JOBS = 3000
BOUND = 200


def test_submit_into_a_full_queue_prints_every_id_once_a_late_worker_has_drained_it(iris_store: Env) -> None:
    # Given a jobs queue bounded at 200 and no worker yet
    ids = [f"bp-{i}" for i in range(JOBS)]
    jobs_file = iris_store.tmp / "jobs.jsonl"
    jobs_file.write_text("".join(dumps(job_dict(id=job_id)).decode() + "\n" for job_id in ids))
    bounded = {"INFERQ_MAX_QUEUE_LENGTH": str(BOUND), "INFERQ_LOG_LEVEL": "error"}

    # When 3,000 jobs are submitted and a worker starts two seconds later
    submit = subprocess.Popen(
        [sys.executable, "-m", "inferq", "submit", str(jobs_file)],
        env=iris_store.environ(**bounded),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: iris_store.depth(iris_store.jobs_queue) >= BOUND, timeout_s=60)
    time.sleep(2)  # the broker refuses publishes all this time
    with BackgroundWorker(iris_store.worker_settings(max_queue_length=BOUND)):
        out, err = submit.communicate(timeout=170)
        printed = out.split()
        wait_for(lambda: len(iris_store.stored()) >= len(set(printed)), timeout_s=60)

    # Then it exits 0 having printed every id exactly once, and every job has a result
    assert "OverflowError" not in err
    assert len(printed) == JOBS and set(printed) == set(ids), f"{JOBS - len(set(printed))} ids missing"
    assert submit.returncode == 0, err
    assert set(iris_store.stored()) == set(ids)
