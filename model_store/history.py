"""The alias history: every move of a model's aliases (by a person, by publishing, or by a guard that rolled
one back or kept it), newest last, in ``<model>/history.json``.

Entries are appended with the store's compare-and-swap and carry an id: recording an entry twice (a retried
or repeated rollback) keeps one.
"""

from __future__ import annotations

import getpass
import socket
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from inferq.shared.errors import StoreError

if TYPE_CHECKING:
    from inferq.model_store.base import ModelStore

HISTORY_FILE = "history.json"
HISTORY_KEPT = 1000
"""Entries kept per model (the oldest go first): a history is read whole on every move."""


class GuardSpec(BaseModel):
    """What a guarded move watches, over the jobs that resolve the alias to the new version: once ``window``
    of them have results, a share of failures above ``error_rate`` moves the alias back; once ``window`` of
    their predictions have labels, an accuracy below ``min_accuracy`` does. Either or both."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    error_rate: Annotated[float, Field(ge=0, lt=1)] | None = None
    min_accuracy: Annotated[float, Field(gt=0, le=1)] | None = None
    window: Annotated[int, Field(ge=1)]

    @model_validator(mode="after")
    def _watches_something(self) -> GuardSpec:
        if self.error_rate is None and self.min_accuracy is None:
            raise ValueError("a guard watches an error rate, an accuracy, or both")
        return self

    @property
    def checks(self) -> int:
        """How many things the guard watches (1 or 2)."""
        return (self.error_rate is not None) + (self.min_accuracy is not None)

    def describe(self) -> str:
        """``error rate > 10% over 50 jobs``: how a person reads it."""
        parts = []
        if self.error_rate is not None:
            parts.append(f"error rate > {self.error_rate:.0%} over {self.window} jobs")
        if self.min_accuracy is not None:
            parts.append(f"accuracy < {self.min_accuracy:.0%} over {self.window} labeled predictions")
        return " or ".join(parts)


class AliasMove(BaseModel):
    """One entry of the history: ``alias`` went from ``from_version`` (``None``: it did not exist) to
    ``to_version``, when, by whom (``user@host``, or ``guard``) and why."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    at: datetime
    alias: str
    from_version: int | None
    to_version: int
    by: str
    reason: str = ""
    guard: GuardSpec | None = None
    """The guard this move started, if any."""


_History = TypeAdapter(list[AliasMove])


def actor() -> str:
    """``user@host`` of this process: who a move from here is recorded as made by."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name for the uid (containers): the uid says enough
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def now() -> datetime:
    """The time stamped on entries: UTC, to the second's millisecond."""
    return datetime.now(UTC)


def read_history(store: ModelStore, name: str) -> list[AliasMove]:
    """Every recorded move of ``name``'s aliases, oldest first (empty when none was ever recorded)."""
    return _parse(store, name, store.read_document(name, HISTORY_FILE))


def record_move(store: ModelStore, name: str, move: AliasMove) -> None:
    """Append ``move`` to ``name``'s history, unless an entry with its id is there already."""

    def append(raw: bytes | None) -> bytes | None:
        entries = _parse(store, name, raw)
        if any(entry.id == move.id for entry in entries):
            return None
        return _History.dump_json([*entries, move][-HISTORY_KEPT:])

    store.update_document(name, HISTORY_FILE, append)


def _parse(store: ModelStore, name: str, raw: bytes | None) -> list[AliasMove]:
    if raw is None:
        return []
    try:
        return _History.validate_json(raw)
    except ValidationError:
        raise StoreError(f"corrupt alias history of {name!r} in {store.describe()}") from None
