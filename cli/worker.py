"""``inferq worker``: consume jobs, run them in micro-batches, store and publish every result."""

from __future__ import annotations

import click

from inferq.cli.common import Command, settings
from inferq.shared.config.settings import WorkerSettings


@click.command(cls=Command)
@click.option("--drain", is_flag=True, help="Process until the jobs queue is empty, then exit 0.")
def worker(drain: bool) -> None:
    """Consume jobs, run them in micro-batches, store and publish every result."""
    from inferq.worker.worker import run_worker  # noqa: PLC0415  (the worker's imports are heavy: load on use)

    run_worker(settings(WorkerSettings), drain=drain)
