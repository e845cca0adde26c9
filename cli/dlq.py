"""``inferq dlq``: list and replay the dead-letter queue."""

from __future__ import annotations

import click
import orjson

from inferq.admin.dead_letters import DeadLetter, list_dead_letters, replay
from inferq.cli.common import Group, echo_flush, settings
from inferq.shared.config.settings import OperatorSettings


@click.group(cls=Group)
def dlq() -> None:
    """Inspect and replay the dead-letter queue (<INFERQ_JOBS_QUEUE>.dlq)."""


@dlq.command("list")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1), help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per dead letter.")
def dlq_list(limit: int, as_json: bool) -> None:
    """Show dead-lettered jobs, oldest first, with the reason; removes nothing."""
    loaded = settings(OperatorSettings)
    letters, total = list_dead_letters(loaded, limit)
    for letter in letters:
        if as_json:
            click.echo(orjson.dumps(letter).decode())
        else:
            click.echo(
                f"{letter.message_id or '-':<40} {letter.model or '-':<16} {letter.size_bytes:>8}B  {letter.reason}"
            )
    if not as_json:
        click.echo(f"{len(letters)} shown of {total} in {loaded.dlq_queue}")


@dlq.command("replay")
@click.option("--id", "job_id", help="Replay the dead letter with this job id.")
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter.")
def dlq_replay(job_id: str | None, replay_all: bool) -> None:
    """Republish dead letters to the jobs queue; each leaves the DLQ only once the broker confirmed its copy.

    Prints each replayed id as soon as it is safe."""
    if (job_id is None) == (not replay_all):
        raise click.UsageError("give either --id ID or --all")
    replayed = replay(settings(OperatorSettings), job_id=job_id, on_replayed=_echo_replayed)
    click.echo(f"replayed {len(replayed)}", err=True)


def _echo_replayed(letter: DeadLetter) -> None:
    # A dead letter without an AMQP message id (published by hand, or a body that was never a job)
    # is still replayed: say so, with what is known about it, rather than print "None".
    echo_flush(letter.message_id or f"(no id: {letter.size_bytes}B, reason {letter.reason})")
