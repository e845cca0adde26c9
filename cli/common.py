"""What the command groups share: settings, version arguments, a model's table, flushed output, progress bars,
and the command classes that turn a missing optional dependency into one line naming its extra."""

from __future__ import annotations

import sys
from typing import Any, TypeVar

import click
from tqdm import tqdm

from inferq.model_store.base import read_table
from inferq.model_store.stores import open_model_store
from inferq.shared.config.logging import configure_logging
from inferq.shared.config.settings import InferqSettings, load_settings
from inferq.shared.contract.messages import VersionRef, parse_version_ref
from inferq.shared.extras import MissingExtra, extra_of
from inferq.shared.tables.table import Table

S = TypeVar("S", bound=InferqSettings)
EXIT_FAILURE = 1
EXIT_CONFIG = 2


class Command(click.Command):
    """A command that fails with :class:`MissingExtra` naming itself (``inferq serve needs the http
    extra: …``) when it meets an optional dependency that is not installed, instead of an ImportError."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MissingExtra as exc:  # raised where a store or feature was opened: the user ran a command
            raise MissingExtra(exc.extra, ctx.command_path) from exc
        except ModuleNotFoundError as exc:
            extra = extra_of(exc)
            if extra is None:
                raise
            raise MissingExtra(extra, ctx.command_path) from exc


class Group(click.Group):
    """A command group whose commands and subgroups are :class:`Command` and :class:`Group`."""

    command_class = Command
    group_class = type  # subgroups of the same class as this one


def settings(cls: type[S]) -> S:
    """The process's settings, with logging configured from them (the broker URL redacted)."""
    loaded = load_settings(cls)
    configure_logging(loaded.log_level, loaded.log_format, [loaded.amqp_url.get_secret_value()])
    return loaded


def version_ref(value: str) -> VersionRef:
    """A ``--version`` (or version argument) value: a number, ``latest`` or an alias."""
    try:
        return parse_version_ref(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def model_table(loaded: InferqSettings, model: str, version: VersionRef) -> Table:
    """The columns ``model`` at ``version`` reads, from the model store (``latest`` or an alias resolved now)."""
    return read_table(open_model_store(loaded.model_store), model, version)


def echo_flush(text: str) -> None:
    """Print a line at once: a caller reading the ids as they come must not wait for a full buffer."""
    click.echo(text)
    sys.stdout.flush()


def advance(bar: tqdm[Any], rows: float) -> None:
    """Move a progress bar on by ``rows``."""
    bar.update(rows)
