"""``inferq status``: queue depths and consumers, and the models, versions and aliases in the store."""

from __future__ import annotations

import click
import orjson

from inferq.admin.status import collect_status, render_status
from inferq.cli.common import Command, settings
from inferq.shared.config.settings import OperatorSettings


@click.command(cls=Command)
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
def status(as_json: bool) -> None:
    """Queue depths and consumers (jobs, results, DLQ), and the models, versions and aliases in the store."""
    report = collect_status(settings(OperatorSettings))
    click.echo(orjson.dumps(report.to_dict()).decode() if as_json else "\n".join(render_status(report)))
