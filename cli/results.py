"""``inferq results``: read one result, export many, or copy a whole result store to another."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import click
from pydantic import ValidationError
from tqdm import tqdm

from inferq.cli.common import Group, advance, settings
from inferq.producer.export import FORMATS, ExportError, copy_results, export, output_format, read_ids, results_of
from inferq.shared.config.settings import InferqSettings
from inferq.shared.contract.codec import describe_validation_error
from inferq.shared.contract.messages import Result
from inferq.shared.errors import StoreError
from inferq.shared.results.stores import open_result_store


@click.group(cls=Group)
def results() -> None:
    """Read the result store (INFERQ_RESULT_STORE)."""


@results.command("get")
@click.argument("job_id")
def results_get(job_id: str) -> None:
    """Print the stored result of JOB_ID; exit 1 when there is none."""
    store = open_result_store(settings(InferqSettings).result_store)
    try:
        result = store.get(job_id)
    except ValidationError as exc:
        raise StoreError(
            f"the stored result of job {job_id!r} is unreadable: {describe_validation_error(exc)}"
        ) from None
    click.echo(result.model_dump_json(indent=2))


@results.command("export")
@click.option("--ids", "ids_file", type=click.Path(path_type=Path), help="Export these job ids (one a line).")
@click.option("--model", help="Export the results of this model only.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="csv or jsonl (default: from --out, else csv).")
@click.option("--out", type=click.Path(path_type=Path), help="Write here instead of standard output.")
def results_export(ids_file: Path | None, model: str | None, fmt: str | None, out: Path | None) -> None:
    """Stream results as CSV (id,status,version,error_code,outputs…) or JSON lines (one result each)."""
    if ids_file is not None and model is not None:
        raise click.UsageError("give --ids or --model, not both")
    chosen = output_format(out, fmt)
    store = open_result_store(settings(InferqSettings).result_store)
    if ids_file is not None:
        ids = read_ids(ids_file)
        total: int | None = len(ids)
        source: Iterable[tuple[str, Result | None]] = results_of(store, ids)
    else:
        total = store.count(model)
        source = ((r.id, r) for r in store.scan(model))
    with _output(out) as handle, _bar(total, "exported") as bar:
        written, missing = export(source, handle, chosen, lambda: advance(bar, 1))
    suffix = f", {missing} ids without a result" if missing else ""
    click.echo(f"exported {written} results{suffix}", err=True)


@results.command("copy")
@click.argument("source")
@click.argument("target")
def results_copy(source: str, target: str) -> None:
    """Copy every result from the store at SOURCE to the store at TARGET (same forms as INFERQ_RESULT_STORE);
    ids TARGET already has are skipped, so an interrupted copy can simply be run again."""
    settings(InferqSettings)  # logging
    origin = open_result_store(source, setting="SOURCE")
    destination = open_result_store(target, setting="TARGET")
    try:
        with _bar(origin.count(), "copied") as bar:
            report = copy_results(origin, destination, lambda n: advance(bar, n))
    finally:
        origin.close()
        destination.close()
    click.echo(f"copied {report.copied} results, skipped {report.skipped} already in {destination.describe()}")


@contextmanager
def _output(out: Path | None) -> Iterator[TextIO]:
    if out is None:
        yield sys.stdout
        return
    try:
        handle = out.open("w", newline="")
    except OSError as exc:
        raise ExportError(f"{out}: {exc.strerror}") from None
    with handle:
        yield handle


def _bar(total: int | None, desc: str) -> tqdm[Any]:
    # A progress bar on a terminal only: a pipe or a log file gets the summary line alone.
    return tqdm(total=total, unit="result", desc=desc, file=sys.stderr, disable=not sys.stderr.isatty())
