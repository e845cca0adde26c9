"""``inferq worker``: consume jobs, run them in micro-batches, store and publish every result."""

from __future__ import annotations

import click

from inferq.cli.common import Command, settings
from inferq.shared.config.settings import WorkerSettings
from inferq.shared.errors import ConfigError, StoreRefused


@click.command(cls=Command)
@click.option("--drain", is_flag=True, help="Process until the jobs queue is empty, then exit 0.")
def worker(drain: bool) -> None:
    """Consume jobs, run them in micro-batches, store and publish every result."""
    from inferq.worker.worker import run_worker  # noqa: PLC0415  (the worker's imports are heavy: load on use)

    try:
        run_worker(settings(WorkerSettings), drain=drain)
    except StoreRefused as exc:
        # Exit 2, as for a bad setting: the store's credentials, permissions, bucket or table need an
        # operator; the jobs in flight went back to the queue, none acked.
        raise ConfigError(f"the result store refuses this worker: {exc}") from None
