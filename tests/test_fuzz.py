"""Property-based fuzzing of job payloads: through the decoder, and through the real broker and worker.
Every input yields a typed result or a dead-letter entry; nothing crashes, stalls or disappears."""

from __future__ import annotations

import itertools
import json
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import AMQP_URL, Env, Models

from inferq.model_store.base import publish, set_alias
from inferq.shared.broker.amqp import declare_topology
from inferq.shared.contract.codec import Rejected, Undecodable, _fast_job, _read_wire_job, decode_job
from inferq.shared.contract.messages import Job, Result, job_digest

LIMIT = 64 * 1024
_ids = itertools.count()

leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=12),
)
json_value = st.recursive(
    leaf,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
datatype = st.sampled_from(["FP32", "FP64", "INT64", "BOOL", "BYTES", "UINT8", "FP99", "", "fp32"])
tensor = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["X", "Y", ""]),
        "shape": st.lists(st.integers(min_value=-2, max_value=5), max_size=4) | json_value,
        "datatype": datatype,
        "data": st.lists(leaf, max_size=24) | json_value,
    }
)
job_like = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["iris", "nope", "../etc", "", "a/b"]) | json_value,
        "version": st.sampled_from([1, 2, 0, -1, 9, "latest", "champion", "ghost", "2", "../x"]) | json_value,
        "inputs": st.lists(tensor, max_size=3) | json_value,
    },
    optional={
        "parameters": json_value,
        "deadline": st.sampled_from(["2020-01-01T00:00:00Z", "2099-01-01T00:00:00Z", "2099-01-01T00:00:00", "soon"]),
        "surplus": json_value,
    },
)
# A valid 4-feature iris job (that must succeed), to keep real work in the mix.
valid_job = st.lists(st.floats(min_value=-10, max_value=10, width=32), min_size=4, max_size=4).map(
    lambda row: {"model": "iris", "inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": row}]}
)


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """A message body and its AMQP message_id, each id (when there is one) unique to the message."""
    unique = f"fz-{next(_ids)}"
    kind = draw(st.sampled_from(["job", "valid", "json", "bytes"]))
    body: bytes
    if kind in ("job", "valid"):
        payload: dict[str, Any] = draw(valid_job if kind == "valid" else job_like)
        if draw(st.booleans()) or kind == "valid":
            payload["id"] = unique
        elif draw(st.booleans()):
            payload["id"] = draw(json_value)
        body = json.dumps(payload).encode()  # the stdlib writes huge integers, and NaN as a bare token
    elif kind == "json":
        body = json.dumps(draw(json_value)).encode()
    else:
        body = draw(st.binary(max_size=64))
    return body, unique if draw(st.booleans()) else None


def body_id(body: bytes) -> object:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return value.get("id") if isinstance(value, dict) else None


def expected_id(body: bytes, message_id: str | None) -> str | None:
    decoded = decode_job(body, message_id, LIMIT)
    if isinstance(decoded, Job):
        return decoded.id
    if isinstance(decoded, Rejected):
        return decoded.job_id
    return None


@settings(max_examples=1000, deadline=None)
@given(messages())
def test_the_decoder_turns_every_message_into_a_value(message: tuple[bytes, str | None]) -> None:
    body, message_id = message
    decoded = decode_job(body, message_id, LIMIT)
    assert isinstance(decoded, Job | Rejected | Undecodable)
    if isinstance(decoded, Rejected):
        assert decoded.job_id in (message_id, body_id(body))
        assert str(decoded.error)
    if isinstance(decoded, Undecodable):
        assert message_id is None and decoded.reason


number = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.floats(allow_nan=False, allow_infinity=False),
)
plain_job = st.fixed_dictionaries(
    {
        "id": st.sampled_from(["j-1", "a:b.c_d-9", "", "x" * 129, "x" * 128, "bad id", "j\n"]),
        "model": st.sampled_from(["iris", "m.v2", "../etc", "", "a/b", "x" * 300]),
        "inputs": st.lists(
            st.fixed_dictionaries(
                {
                    "name": st.sampled_from(["X", "", "y" * 257]),
                    "shape": st.lists(st.integers(min_value=-1, max_value=3), min_size=0, max_size=9),
                    "datatype": datatype,
                    "data": st.lists(number, max_size=9),
                }
            ),
            min_size=0,
            max_size=3,
        ),
    },
    optional={
        "version": st.sampled_from([1, 2, 0, -1, True, None, 1.0, "latest", "champion", "2", "v2", "../x", ""]),
        "parameters": st.none() | st.dictionaries(st.text(max_size=4), json_value, max_size=3),
        "deadline": st.none() | st.sampled_from(["", "2099-01-01T00:00:00Z"]),
    },
)


def strict(job: Job) -> bytes:
    """The job as JSON, 1 and 1.0 and True told apart (a result's job digest tells them apart too)."""
    return json.dumps(job.model_dump(mode="json"), sort_keys=True).encode()


@settings(max_examples=3000, deadline=None)
@given(payload=plain_job | job_like.map(lambda p: {"id": "j-1", **p}))
def test_the_fast_path_reads_a_job_exactly_as_the_contract_does(payload: dict[str, Any]) -> None:
    """Whatever the fast path accepts, the contract (pydantic) accepts, and reads identically."""
    body = json.dumps(payload).encode()
    try:
        fast = _fast_job(_read_wire_job(body))
    except (msgspec.DecodeError, msgspec.ValidationError):
        fast = None
    if fast is not None:
        assert strict(fast) == strict(Job.model_validate_json(body))
        assert job_digest(fast) == job_digest(Job.model_validate_json(body))
    decoded = decode_job(body, None, LIMIT)
    if isinstance(decoded, Job):
        assert strict(decoded) == strict(Job.model_validate_json(body))


def test_plain_jobs_take_the_fast_path() -> None:
    """The common job (numbers, a name, maybe a version and parameters) never pays for pydantic."""
    for data in ([0.5, -1.0, 2.25, 0.0], [1, 2, 3, 4], [True, False, True, True], [1, 2.5, True, -(2**63)]):
        for version in (None, 3, "latest", "champion", "7"):
            payload = {
                "id": "j-1",
                "model": "iris",
                "inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": data}],
            }
            if version is not None:
                payload |= {"version": version, "parameters": {"top_k": 2}}
            job = _fast_job(_read_wire_job(json.dumps(payload).encode()))
            assert job is not None, payload
            assert strict(job) == strict(Job.model_validate(payload))


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.broker
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(messages(), min_size=100, max_size=100))
def test_the_worker_gives_every_fuzzed_message_a_result_or_a_dead_letter(
    batch: list[tuple[bytes, str | None]], fuzz_root: Path, models: Models
) -> None:
    env = Env(fuzz_root / uuid.uuid4().hex[:8], f"fuzz.{uuid.uuid4().hex[:10]}")
    publish(env.store, "iris", models.forest_onnx)
    publish(env.store, "iris", models.logistic_onnx)
    set_alias(env.store, "iris", "champion", 1)
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    declare_topology(channel, env.worker_settings())
    channel.confirm_delivery()
    for body, message_id in batch:
        channel.basic_publish("", env.jobs_queue, body, pika.BasicProperties(message_id=message_id), mandatory=True)
    connection.close()
    try:
        counters = env.drain(max_message_bytes=LIMIT)

        ids = [expected_id(body, message_id) for body, message_id in batch]
        with_id = [i for i in ids if i is not None]
        results = env.results_on_queue()
        dead = env.read_queue(f"{env.jobs_queue}.dlq")
        assert counters.received == len(batch)
        assert sorted(r.id for r in results) == sorted(with_id), "one result per message with a readable id"
        assert set(env.stored()) == set(with_id)
        assert len(dead) == ids.count(None), "every message without a readable id is dead-lettered"
        assert all(props.headers["x-inferq-reason"] for props, _ in dead)
        assert all(isinstance(r, Result) and (r.error is None) == (r.status == "succeeded") for r in results)
        valid = {body_id(b) for b, _ in batch if b'"model": "iris", "inputs": [{"name": "X", "shape": [1, 4]' in b}
        assert all(env.stored()[i].status == "succeeded" for i in valid if i in env.stored())
    finally:
        env.delete_queues()
