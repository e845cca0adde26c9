"""``inferq submit``: publish jobs from a JSONL file, rows of a model, or one ``--input``, each confirmed."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import BinaryIO

import click
import orjson
from pydantic import ValidationError

from inferq.cli.common import EXIT_FAILURE, Command, echo_flush, model_table, settings, version_ref
from inferq.producer.client import Producer, new_job_id
from inferq.producer.rows import job_from_rows
from inferq.shared.config.settings import InferqSettings, ProducerSettings
from inferq.shared.contract.codec import describe_validation_error
from inferq.shared.contract.messages import Job, Tensor, VersionRef
from inferq.shared.errors import InvalidPayload
from inferq.shared.tables.rowfile import jsonl_records
from inferq.shared.tables.table import RowError, Table

_TENSOR_KEYS = frozenset({"name", "datatype", "shape", "data", "parameters"})


def _is_tensor(value: object) -> bool:
    """A KServe tensor object (as opposed to a row of named columns)."""
    return isinstance(value, dict) and {"name", "datatype", "shape", "data"} <= value.keys() <= _TENSOR_KEYS


def _job_from_input(loaded: InferqSettings, model: str, version: VersionRef, raw: str) -> Job:
    """``--input`` is KServe tensors (a list of tensor objects), one row (an object by column name, or an
    array) or a list of rows."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidPayload(f"--input is not JSON: {exc}") from None
    try:
        if isinstance(value, list) and value and all(_is_tensor(v) for v in value):
            return Job(id=new_job_id(), model=model, version=version, inputs=[Tensor.model_validate(v) for v in value])
        rows = value if isinstance(value, list) and value and isinstance(value[0], list | dict) else [value]
        return job_from_rows(model_table(loaded, model, version), rows, version=version)
    except RowError as exc:
        raise InvalidPayload(f"--input {exc}") from None
    except (ValidationError, TypeError) as exc:
        detail = describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
        raise InvalidPayload(f"--input: {detail}") from None


def _jobs_from_lines(name: str, handle: BinaryIO) -> Iterator[Job]:
    for record in jsonl_records(name, handle):
        value = record.values
        try:
            if isinstance(value, dict) and "id" not in value:
                value["id"] = new_job_id()
            yield Job.model_validate(value)
        except ValidationError as exc:
            raise InvalidPayload(f"{name}:{record.line}: {describe_validation_error(exc)}") from None


def _jobs_from_row_lines(name: str, handle: BinaryIO, table: Table, version: VersionRef) -> Iterator[Job]:
    """One job per line of rows: each line an object by column name, or an array in column order."""
    for record in jsonl_records(name, handle):
        try:
            yield job_from_rows(table, [record.values], version=version)
        except RowError as exc:
            raise InvalidPayload(f"{name}:{record.line}: {exc.detail}") from None


@click.command(cls=Command)
@click.argument("jobs_file", required=False, type=click.File("rb"))
@click.option("--model", help="Model name: for --input, or to read JOBS_FILE as rows of that model.")
@click.option("--version", "version", default="latest", show_default=True, help="Version, 'latest' or an alias.")
@click.option("--input", "raw_input", help="One job: a row ({...}), rows ([{...}, ...] or [[...]]) or KServe tensors.")
@click.option("--wait", is_flag=True, help="Wait for the single job's result and print it.")
@click.option("--timeout", "timeout_s", default=60.0, show_default=True, help="Seconds --wait waits.")
def submit(
    jobs_file: BinaryIO | None,
    model: str | None,
    version: str,
    raw_input: str | None,
    wait: bool,
    timeout_s: float,
) -> None:
    """Publish jobs from JOBS_FILE (JSONL of jobs, '-' for stdin), or with --model one job per line of
    rows (objects by column name, or arrays), or one job with --model and --input.

    Prints each job id once the broker has confirmed it."""
    loaded = settings(ProducerSettings)
    if jobs_file is None and (model is None or raw_input is None):
        raise click.UsageError("give JOBS_FILE, JOBS_FILE with --model (rows), or --model with --input")
    if jobs_file is not None and raw_input is not None:
        raise click.UsageError("give either JOBS_FILE or --input, not both")
    ref = version_ref(version)
    with Producer(loaded) as producer:
        if jobs_file is not None:
            name = "<stdin>" if jobs_file.name in ("-", "<stdin>") else str(jobs_file.name)
            jobs = (
                _jobs_from_row_lines(name, jobs_file, model_table(loaded, model, ref), ref)
                if model is not None
                else _jobs_from_lines(name, jobs_file)
            )
            producer.publish_many(jobs, on_confirmed=echo_flush)
            return
        assert model is not None and raw_input is not None
        job = _job_from_input(loaded, model, ref, raw_input)
        if not wait:
            echo_flush(producer.publish(job))
            return
        result = producer.request(job, timeout_s)
        click.echo(result.model_dump_json(indent=2))
        if result.error is not None:
            sys.exit(EXIT_FAILURE)
