"""The audit of a world where one job id was used for two different jobs: the first job's result is the
id's one result, the second job is its one dead letter (``id_conflict``), and every other job is audited
as usual (one result of its own, or one dead letter)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from support import Env

from inferq.shared.broker.topology import REASON_HEADER
from inferq.shared.contract.codec import decode_job
from inferq.shared.contract.messages import Job, Result, job_digest


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def audit_id_conflict(
    env: Env, winner: Job, loser: Job, others: Mapping[str, Job], *, dead: frozenset[str] = frozenset()
) -> None:
    """``winner`` holds the shared id's stored result, ``loser`` was dead-lettered as ``id_conflict`` (with
    its own body), nothing answers ``loser`` with ``winner``'s result; ``others`` each end in exactly one
    result of their own or (those in ``dead``) one dead letter; nothing is left queued."""
    assert winner.id == loser.id and job_digest(winner) != job_digest(loser)
    stored = env.stored()
    letters = env.read_queue(f"{env.jobs_queue}.dlq")
    on_queue = [Result.model_validate_json(body) for _, body in env.read_queue(env.results_queue)]
    # The shared id: one result, the winner's; one dead letter, the loser's, for the conflict.
    assert stored[winner.id].job_sha256 == job_digest(winner)
    shared = [(props, body) for props, body in letters if props.message_id == winner.id]
    assert len(shared) == 1, f"{len(shared)} dead letters for {winner.id}"
    props, body = shared[0]
    assert _text((props.headers or {})[REASON_HEADER]) == "id_conflict"
    decoded = decode_job(body, props.message_id, 1 << 24)
    assert isinstance(decoded, Job) and job_digest(decoded) == job_digest(loser)
    assert {r.job_sha256 for r in on_queue if r.id == winner.id} == {job_digest(winner)}
    # Every other job: its own result, or its one dead letter.
    dead_ids = Counter(p.message_id for p, _ in letters if p.message_id != winner.id)
    assert set(dead_ids) == set(dead) and all(n == 1 for n in dead_ids.values()), dead_ids
    for job_id, job in others.items():
        if job_id in dead:
            assert job_id not in stored, f"{job_id}: dead-lettered and stored"
        else:
            assert stored[job_id].job_sha256 == job_digest(job), f"{job_id}: the stored result answers another job"
    assert {r.id for r in on_queue} == {winner.id} | {i for i in others if i not in dead}
    assert env.depth(env.jobs_queue) == 0 and env.depth(f"{env.jobs_queue}.retry") == 0
    print(
        f"audit: {len(others) + 2} jobs under {len(others) + 1} ids, {len(stored)} stored, {len(letters)} dead-lettered"
    )
