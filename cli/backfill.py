"""``inferq backfill``: every row of a file as jobs for one model version, and with ``--out`` their results."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from tqdm import tqdm

from inferq.admin.dead_letters import DeadLetterWatch
from inferq.cli.common import EXIT_FAILURE, Command, advance, model_table, settings, version_ref
from inferq.producer.backfill import BackfillPlan, backfill_jobs, check_blocks, confirm_window, rows_per_job
from inferq.producer.client import Producer
from inferq.producer.collect import ExpectedJob, JobTracker, expected_jobs, write_backfill_output
from inferq.producer.export import OUT_FORMATS, out_format
from inferq.shared.config.settings import OperatorSettings, ProducerSettings, load_settings
from inferq.shared.extras import TABLES, needs_extra
from inferq.shared.results.base import ResultStore
from inferq.shared.results.stores import open_result_store

if TYPE_CHECKING:
    from inferq.producer.client import Encoded
    from inferq.shared.tables.block import Block

BARS: dict[str, Any] = {"file": sys.stderr, "dynamic_ncols": True, "unit": "row"}


@click.command(cls=Command)
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--model", required=True, help="Model name.")
@click.option(
    "--version", "version", default="latest", show_default=True, help="Version, 'latest' or an alias (resolved once)."
)
@click.option("--id-column", help="Column (or JSON key) holding each row's id.")
@click.option(
    "--batch-rows",
    type=click.IntRange(min=1),
    help="Rows per job [default: a few hundred kilobytes' worth, from the model's columns].",
)
@click.option("--out", type=click.Path(path_type=Path), help="Wait for every row's result and write them here.")
@click.option("--format", "fmt", type=click.Choice(OUT_FORMATS), help="Format of --out (default: from its suffix).")
def backfill(
    data: Path,
    model: str,
    version: str,
    id_column: str | None,
    batch_rows: int | None,
    out: Path | None,
    fmt: str | None,
) -> None:
    """Turn every row of DATA (.csv with a header, .parquet or .jsonl) into jobs of many rows for one model
    version. The file is checked whole before anything is published. A job's id follows its rows' content:
    a rerun on the same version skips the jobs already finished and those waiting in the dead-letter
    queue, and scores a job whose rows changed again.

    With --out, then wait for every row's result and write the id column, the error code and detail and
    the outputs, in input order (.csv, .parquet or .jsonl). A row whose job was dead-lettered, or vanished
    with nothing left queued or in flight, is written with an error code saying so, and the command exits 1."""
    with needs_extra(TABLES, "inferq backfill"):
        from inferq.shared.tables import columnar  # noqa: PLC0415  (pyarrow: the tables extra)
    loaded = settings(ProducerSettings)
    written_as = out_format(out, fmt) if out is not None else None
    table = model_table(loaded, model, version_ref(version))  # 'latest' or an alias: resolved once, here
    rows = batch_rows or rows_per_job(table, loaded.max_message_bytes)
    results = open_result_store(loaded.result_store)

    def blocks() -> Iterator[Block]:
        return columnar.read_blocks(data, table, id_column)

    # The whole file, before any publish; the bar only on a terminal, and gone once done: an error stays one line.
    with tqdm(desc="checked", leave=False, disable=None, **BARS) as bar:
        total = check_blocks(blocks, lambda index: columnar.place_of(data, index), lambda n: advance(bar, n))
    plan = BackfillPlan()
    # The same variables, read for the management API as well (the operator commands' settings).
    with DeadLetterWatch(load_settings(OperatorSettings)) as watch:
        producing = loaded.model_copy(update={"confirm_window": confirm_window(table, rows, loaded.confirm_window)})

        def jobs(on_skip: Callable[[int], None], on_publish: Callable[[str, int], None]) -> Iterator[Encoded]:
            return backfill_jobs(
                blocks(),
                table=table,
                batch_rows=rows,
                results=results,
                plan=plan,
                dead_lettered=watch.dead_lettered,
                on_skip=on_skip,
                on_publish=on_publish,
            )

        _publish(producing, jobs, total)
        dead = f" and {plan.dead_lettered_jobs} dead-lettered (inferq dlq list)" if plan.dead_lettered_jobs else ""
        click.echo(
            f"published {plan.jobs} jobs ({plan.rows} rows) on {model} version {table.version}, "
            f"skipped {plan.skipped_jobs} already finished{dead}"
        )
        if out is not None and written_as is not None:
            expected = expected_jobs(blocks(), table, rows, columnar.first_line(data))
            _collect(results, expected, watch, out, written_as, id_column or "line", total)


Jobs = Callable[[Callable[[int], None], Callable[[str, int], None]], "Iterator[Encoded]"]
"""The backfill's jobs, given what to call for rows skipped and for a job handed to the publisher."""


def _publish(loaded: ProducerSettings, jobs: Jobs, total: int) -> None:
    """Publish every job, the bar counting rows confirmed by the broker (and rows skipped) with rate and ETA."""
    in_flight: dict[str, int] = {}
    with tqdm(total=total, desc="published", **BARS) as bar:

        def confirmed(job_id: str) -> None:
            advance(bar, in_flight.pop(job_id, 0))

        try:
            with Producer(loaded) as producer:
                producer.publish_many(jobs(lambda n: advance(bar, n), in_flight.__setitem__), on_confirmed=confirmed)
        except KeyboardInterrupt:
            bar.close()
            click.echo(
                f"inferq: interrupted: {int(bar.n)} of {total} rows published or already finished. Run the same "
                "command again to resume: it publishes nothing twice.",
                err=True,
            )
            sys.exit(130)


def _collect(
    store: ResultStore,
    expected: Iterable[ExpectedJob],
    tracker: JobTracker,
    out: Path,
    fmt: str,
    header: str,
    total: int,
) -> None:
    # Two bars that each tell the truth: rows whose job has ended (a result, or none to wait for), and
    # rows in the file. Each has its own rate and ETA.
    bars: dict[str, Any] = {"file": sys.stderr, "dynamic_ncols": True, "unit": "row", "total": total}
    with tqdm(desc="finished", position=0, **bars) as finished, tqdm(desc="written", position=1, **bars) as written:
        try:
            collected = write_backfill_output(
                store,
                expected,
                out,
                fmt,
                header,
                tracker,
                on_finished=lambda n: advance(finished, n),
                on_written=lambda n: advance(written, n),
            )
        except KeyboardInterrupt:
            finished.close()
            written.close()
            click.echo(
                f"inferq: interrupted: {int(finished.n)} of {total} rows finished; the jobs stay queued. Run the "
                "same command again to resume: it publishes nothing twice and waits for the rest.",
                err=True,
            )
            sys.exit(130)
    click.echo(
        f"wrote {collected.rows} rows to {out} (waited {collected.waiting_s:.1f}s for workers, read results "
        f"{collected.reading_s:.1f}s, wrote {collected.writing_s:.1f}s)"
    )
    if collected.missing:
        click.echo(
            f"inferq: {collected.missing} of {collected.rows} rows have no result ({collected.dead_lettered} "
            f"dead-lettered, {collected.no_result} vanished): see their error_code in {out}, and inferq dlq list",
            err=True,
        )
        sys.exit(EXIT_FAILURE)
