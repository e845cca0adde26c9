"""``inferq dlq list`` and ``inferq dlq replay`` against the real broker."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pika
import pytest

from inferq.admin.dead_letters import REPLAYED_HEADER
from inferq.cli import _run, cli
from inferq.shared.broker.amqp import declare_topology
from inferq.shared.broker.topology import REASON_HEADER
from inferq.shared.config.settings import InferqSettings

pytestmark = pytest.mark.broker


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = _run(cli, list(args))
    out, err = capsys.readouterr()
    return code, out, err


def dead_letter(channel: Any, env: dict[str, str], job_id: str, reason: str = "undecodable: not JSON") -> bytes:
    """What the worker does with a message it cannot read: the body unchanged, the reason in a header."""
    body = orjson.dumps({"id": job_id, "model": "tiny", "inputs": "not-a-list"})
    props = pika.BasicProperties(
        message_id=job_id, delivery_mode=2, content_type="application/json", headers={REASON_HEADER: reason}
    )
    channel.confirm_delivery()
    channel.basic_publish("", env["INFERQ_JOBS_QUEUE"] + ".dlq", body, props, mandatory=True)
    return body


def depth(channel: Any, queue: str) -> int:
    return int(channel.queue_declare(queue, passive=True).method.message_count)


def wait_for_depth(channel: Any, queue: str, expected: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while depth(channel, queue) != expected:
        assert time.monotonic() < deadline, f"{queue} never held {expected} messages"
        time.sleep(0.05)


def drain(channel: Any, queue: str) -> list[tuple[Any, bytes]]:
    taken = []
    while True:
        method, props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return taken
        taken.append((props, body))


def test_dlq_list_shows_inferq_reasons_and_broker_delivery_limits_and_removes_nothing(
    env: dict[str, str], channel: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a message the worker dead-lettered, and a poison job the broker dead-lettered after
    # it was handed back more often than the jobs queue's delivery limit allows
    dead_letter(channel, env, "unreadable-1")
    jobs, dlq = env["INFERQ_JOBS_QUEUE"], env["INFERQ_JOBS_QUEUE"] + ".dlq"
    channel.basic_publish("", jobs, b'{"id": "poison-1"}', pika.BasicProperties(message_id="poison-1"), mandatory=True)
    for _ in range(20):
        method, _props, _body = channel.basic_get(jobs, auto_ack=False)
        if method is None:
            break
        channel.basic_nack(method.delivery_tag, requeue=True)
    wait_for_depth(channel, dlq, 2)  # the broker dead-letters asynchronously

    # When the operator lists the DLQ
    code, out, err = run_cli(capsys, "dlq", "list", "--json")

    # Then both show with their reason, and both are still there
    assert code == 0, err
    letters = {d["message_id"]: d for d in map(orjson.loads, out.splitlines())}
    assert letters["unreadable-1"]["reason"] == "undecodable: not JSON"
    assert letters["unreadable-1"]["model"] == "tiny"
    assert letters["poison-1"]["reason"] == "delivery_limit"
    assert letters["poison-1"]["source_queue"] == jobs
    wait_for_depth(channel, dlq, 2)


def test_dlq_list_respects_the_limit_and_tells_the_total(
    env: dict[str, str], channel: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    for number in range(5):
        dead_letter(channel, env, f"job-{number}")
    code, out, _err = run_cli(capsys, "dlq", "list", "--limit", "2")
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["job-0", "job-1"]
    assert lines[-1] == f"2 shown of 5 in {env['INFERQ_JOBS_QUEUE']}.dlq"
    wait_for_depth(channel, env["INFERQ_JOBS_QUEUE"] + ".dlq", 5)


def test_dlq_replay_by_id_republishes_that_job_alone_with_a_fresh_history(
    env: dict[str, str], channel: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    bodies = {job_id: dead_letter(channel, env, job_id) for job_id in ("a", "b", "c")}

    code, out, err = run_cli(capsys, "dlq", "replay", "--id", "b")

    assert code == 0, err
    assert out.splitlines() == ["b"]
    replayed = drain(channel, env["INFERQ_JOBS_QUEUE"])
    assert len(replayed) == 1
    props, body = replayed[0]
    assert (props.message_id, body) == ("b", bodies["b"])
    assert REASON_HEADER not in props.headers
    assert props.headers[REPLAYED_HEADER] == 1
    wait_for_depth(channel, env["INFERQ_JOBS_QUEUE"] + ".dlq", 2)
    left = drain(channel, env["INFERQ_JOBS_QUEUE"] + ".dlq")
    assert sorted(p.message_id for p, _ in left) == ["a", "c"]


def test_dlq_replay_all_moves_every_dead_letter_to_the_jobs_queue(
    env: dict[str, str], channel: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    for job_id in ("x1", "x2", "x3"):
        dead_letter(channel, env, job_id)

    code, out, err = run_cli(capsys, "dlq", "replay", "--all")

    assert code == 0, err
    assert out.splitlines() == ["x1", "x2", "x3"]
    assert "replayed 3" in err
    assert depth(channel, env["INFERQ_JOBS_QUEUE"] + ".dlq") == 0
    assert [p.message_id for p, _ in drain(channel, env["INFERQ_JOBS_QUEUE"])] == ["x1", "x2", "x3"]


def test_dlq_replay_all_names_letters_without_a_message_id_by_their_body_id_or_says_they_have_none(
    env: dict[str, str], channel: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given dead letters published without an AMQP message id: one whose body has an id, one not JSON
    dlq = env["INFERQ_JOBS_QUEUE"] + ".dlq"
    props = pika.BasicProperties(delivery_mode=2, headers={REASON_HEADER: "undecodable: not JSON"})
    channel.confirm_delivery()
    channel.basic_publish("", dlq, orjson.dumps({"id": "in-body", "model": "tiny"}), props, mandatory=True)
    channel.basic_publish("", dlq, b"\xff not json", props, mandatory=True)

    code, out, err = run_cli(capsys, "dlq", "replay", "--all")

    assert code == 0, err
    assert out.splitlines() == ["in-body", "(no id: 10B, reason undecodable: not JSON)"]
    assert "None" not in out
    assert len(drain(channel, env["INFERQ_JOBS_QUEUE"])) == 2


def test_dlq_replay_into_a_full_jobs_queue_keeps_the_dead_letters(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a jobs queue bounded at one job that is already full, and two dead letters
    monkeypatch.setenv("INFERQ_MAX_QUEUE_LENGTH", "1")
    settings = InferqSettings(jobs_queue=env["INFERQ_JOBS_QUEUE"], max_queue_length=1)
    connection = pika.BlockingConnection(pika.URLParameters(env["INFERQ_AMQP_URL"]))
    channel = connection.channel()
    declare_topology(channel, settings)
    channel.confirm_delivery()
    dead_letter(channel, env, "d1")
    dead_letter(channel, env, "d2")
    # A quorum queue enforces its bound loosely (it may take one more): fill it until it refuses.
    for number in range(10):
        try:
            channel.basic_publish("", settings.jobs_queue, b"{}", pika.BasicProperties(message_id=f"w{number}"))
        except pika.exceptions.NackError:
            break
    waiting = depth(channel, settings.jobs_queue)

    # When the operator replays them, the broker refuses the copy (reject-publish)
    code, out, err = run_cli(capsys, "dlq", "replay", "--all")

    # Then nothing is removed from the DLQ and the jobs queue holds only what it held
    assert code == 1
    assert out == ""
    assert err.startswith("inferq: error: job 'd1' not replayed:")
    wait_for_depth(channel, settings.dlq_queue, 2)  # handed back as the command's channel closed
    assert depth(channel, settings.jobs_queue) == waiting
    connection.close()


def test_dlq_replay_of_an_unknown_id_fails_and_hands_everything_back(
    env: dict[str, str], channel: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    dead_letter(channel, env, "present")
    code, _out, err = run_cli(capsys, "dlq", "replay", "--id", "absent")
    assert code == 1
    assert err.strip() == f"inferq: error: no dead-lettered job with id 'absent' in '{env['INFERQ_JOBS_QUEUE']}.dlq'"
    wait_for_depth(channel, env["INFERQ_JOBS_QUEUE"] + ".dlq", 1)


def test_dlq_replay_needs_exactly_one_of_id_or_all(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "dlq", "replay")[0] == 2
    assert run_cli(capsys, "dlq", "replay", "--id", "a", "--all")[0] == 2
