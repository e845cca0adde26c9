"""The worker's fast decoding path takes text columns too: a tabular job with BYTES inputs reads exactly as
the contract (pydantic) reads it, and its job digest is the same, whatever the strings hold."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from inferq.shared.contract.codec import _fast_job, _read_wire_job, decode_job
from inferq.shared.contract.messages import Job, job_digest

LIMIT = 1 << 24


def _table_job(cities: list[str], ages: list[Any]) -> dict[str, Any]:
    return {
        "id": "bf-1",
        "model": "churn",
        "version": 1,
        "inputs": [
            {"name": "city", "shape": [len(cities), 1], "datatype": "BYTES", "data": cities},
            {"name": "age", "shape": [len(ages), 1], "datatype": "FP32", "data": ages},
        ],
    }


def test_a_job_of_text_and_number_columns_takes_the_fast_path() -> None:
    payload = _table_job(["rome", "oslo", "", 'a "quoted", name\n'], [61, 17.5, 0, -3])
    job = _fast_job(_read_wire_job(json.dumps(payload).encode()))
    assert job is not None
    assert job == Job.model_validate(payload)


@settings(max_examples=300, deadline=None)
@given(
    cities=st.lists(st.text(max_size=12), min_size=1, max_size=6),
    ages=st.lists(st.one_of(st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=3))),
)
def test_text_data_reads_as_the_contract_reads_it(cities: list[str], ages: list[Any]) -> None:
    body = json.dumps(_table_job(cities, ages[: len(cities)] + [1] * (len(cities) - len(ages)))).encode()
    decoded = decode_job(body, None, LIMIT)
    precise = Job.model_validate_json(body)
    assert isinstance(decoded, Job)
    assert decoded.model_dump(mode="json") == precise.model_dump(mode="json")
    assert job_digest(decoded) == job_digest(precise)
