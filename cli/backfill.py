"""``inferq backfill``: every row of a file as jobs for one model version, and with ``--out`` their results."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import click
from tqdm import tqdm

from inferq.admin.dead_letters import DeadLetterWatch
from inferq.cli.common import EXIT_FAILURE, Command, advance, model_table, settings, version_ref
from inferq.producer.backfill import BackfillPlan, backfill_jobs, check_rows, read_rows
from inferq.producer.client import Producer
from inferq.producer.collect import ExpectedJob, JobTracker, expected_jobs, write_backfill_output
from inferq.producer.export import FORMATS, output_format
from inferq.shared.config.settings import OperatorSettings, ProducerSettings, load_settings
from inferq.shared.results.base import ResultStore
from inferq.shared.results.stores import open_result_store


@click.command(cls=Command)
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--model", required=True, help="Model name.")
@click.option(
    "--version", "version", default="latest", show_default=True, help="Version, 'latest' or an alias (resolved once)."
)
@click.option("--id-column", help="Column (or JSON key) holding each row's id.")
@click.option("--batch-rows", default=1, show_default=True, type=click.IntRange(min=1), help="Rows per job.")
@click.option("--out", type=click.Path(path_type=Path), help="Wait for every row's result and write them here.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Format of --out (default: from its suffix).")
def backfill(
    data: Path, model: str, version: str, id_column: str | None, batch_rows: int, out: Path | None, fmt: str | None
) -> None:
    """Turn every row of DATA (.csv with a header, or .jsonl) into jobs for one model version. A job's id
    follows its row's content: a rerun on the same version skips the rows already finished and those
    waiting in the dead-letter queue, and scores a row whose values changed again.

    With --out, then wait for every row's result and write the id column, the error code and detail and
    the outputs, in input order (.csv or .jsonl). A row whose job was dead-lettered, or vanished with
    nothing left queued or in flight, is written with an error code saying so, and the command exits 1."""
    loaded = settings(ProducerSettings)
    out_format = output_format(out, fmt) if out is not None else None
    table = model_table(loaded, model, version_ref(version))  # 'latest' or an alias: resolved once, here
    results = open_result_store(loaded.result_store)
    total = check_rows(data, read_rows(data, table, id_column))  # the whole file, before any publish
    plan = BackfillPlan()
    # The same variables, read for the management API as well (the operator commands' settings).
    with DeadLetterWatch(load_settings(OperatorSettings)) as watch:
        with tqdm(total=total, unit="row", desc="backfill", file=sys.stderr, dynamic_ncols=True) as bar:
            jobs = backfill_jobs(
                read_rows(data, table, id_column),
                table=table,
                batch_rows=batch_rows,
                results=results,
                plan=plan,
                dead_lettered=watch.dead_lettered,
                on_skip=lambda rows: advance(bar, rows),
            )
            with Producer(loaded) as producer:
                producer.publish_many(jobs, on_confirmed=lambda _id: advance(bar, min(batch_rows, total - int(bar.n))))
        dead = f" and {plan.dead_lettered_jobs} dead-lettered (inferq dlq list)" if plan.dead_lettered_jobs else ""
        click.echo(
            f"published {plan.jobs} jobs ({plan.rows} rows) on {model} version {table.version}, "
            f"skipped {plan.skipped_jobs} already finished{dead}"
        )
        if out is not None and out_format is not None:
            expected = expected_jobs(read_rows(data, table, id_column), table, batch_rows)
            _collect(results, expected, watch, out, out_format, id_column or "line", total)


def _collect(
    store: ResultStore,
    expected: Iterable[ExpectedJob],
    tracker: JobTracker,
    out: Path,
    fmt: str,
    header: str,
    total: int,
) -> None:
    with tqdm(total=total, unit="row", desc="finished", file=sys.stderr, dynamic_ncols=True) as bar:
        try:
            collected = write_backfill_output(store, expected, out, fmt, header, tracker, lambda n: advance(bar, n))
        except KeyboardInterrupt:
            bar.close()
            click.echo(
                f"inferq: interrupted: {int(bar.n)} of {total} rows finished; the jobs stay queued. Run the same "
                "command again to resume: it publishes nothing twice and waits for the rest.",
                err=True,
            )
            sys.exit(130)
    click.echo(f"wrote {collected.rows} rows to {out}")
    if collected.missing:
        click.echo(
            f"inferq: {collected.missing} of {collected.rows} rows have no result ({collected.dead_lettered} "
            f"dead-lettered, {collected.no_result} vanished): see their error_code in {out}, and inferq dlq list",
            err=True,
        )
        sys.exit(EXIT_FAILURE)
