"""The ``inferq`` command: a thin layer that wires settings, stores, producer and worker, one module per
command group (models, submit, backfill, results, worker, serve, status, dlq, monitor, labels).

Every failure the user can cause or meet prints one line, ``inferq: error: …``, and exits non-zero;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from inferq.cli.backfill import backfill
from inferq.cli.common import EXIT_CONFIG, EXIT_FAILURE, Group
from inferq.cli.dlq import dlq
from inferq.cli.labels import labels
from inferq.cli.models import models
from inferq.cli.monitor import monitor
from inferq.cli.results import results
from inferq.cli.serve import serve
from inferq.cli.status import status
from inferq.cli.submit import submit
from inferq.cli.worker import worker
from inferq.shared.config.logging import redact_text
from inferq.shared.errors import ConfigError, InferqError

__all__ = ["cli", "main"]

T = TypeVar("T")


@click.group(cls=Group)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """inferq: asynchronous ONNX inference on RabbitMQ."""
    ctx.obj = {"debug": debug}


for _command in (models, worker, serve, submit, backfill, results, status, dlq, monitor, labels):
    cli.add_command(_command)


def _run(entry: Callable[..., T], args: list[str] | None) -> int:
    debug = "--debug" in (args if args is not None else sys.argv[1:])
    try:
        entry.main(args=args, prog_name="inferq", standalone_mode=False)  # type: ignore[attr-defined]
    except click.exceptions.Abort:
        click.echo("inferq: aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (InferqError, TimeoutError, OSError) as exc:
        if debug:
            raise
        click.echo(f"inferq: error: {redact_text(str(exc))}", err=True)
        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAILURE
    return 0


def main(args: list[str] | None = None) -> Any:
    """Console-script entry point."""
    sys.exit(_run(cli, args))
