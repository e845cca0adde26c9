"""Guarded alias moves: the shared record every worker counts into, and the one rollback it may lead to.

``<model>/guards.json`` holds, per alias, the guard of its last move (a later move replaces it). Workers add
the outcomes of the jobs that resolved the alias to the guarded version with the store's compare-and-swap
(a conditional write: the lock of a file store, ``If-Match`` on S3), so counts from any number of workers
and restarts add up. The update that brings the count to the window also decides, in that same write:
exactly one worker ever sees a guard turn from ``watching`` to ``rolling_back`` (or ``passed``), and only
that worker moves the alias back and records it in the history. A guard on accuracy is decided the same
way, by the update that records a count of labeled predictions reaching the window
(:func:`observe_accuracy`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from inferq.model_store.history import AliasMove, GuardSpec, now, record_move
from inferq.shared.errors import StoreError

if TYPE_CHECKING:
    from inferq.model_store.base import ModelStore

GUARDS_FILE = "guards.json"


class GuardState(StrEnum):
    """Where a guard is: counting, decided to roll back (the move back under way), done."""

    WATCHING = "watching"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    PASSED = "passed"


class GuardRecord(BaseModel):
    """The guard of one alias move: the move, what it watches, and the outcomes counted so far."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    """The id of the move that started it (its history entry's id)."""
    alias: str
    from_version: int
    to_version: int
    spec: GuardSpec
    by: str
    started_at: datetime
    succeeded: int = 0
    failed: int = 0
    state: GuardState = GuardState.WATCHING
    decided_at: datetime | None = None
    reason: str = ""
    labeled: int = 0
    """Predictions of the guarded version (from jobs that named the alias) that have a label, last counted."""
    correct: int = 0
    """Of those, the ones whose prediction equals the label."""

    @property
    def counted(self) -> int:
        """Jobs counted so far."""
        return self.succeeded + self.failed

    def add(self, succeeded: int, failed: int) -> GuardRecord:
        """This record with more outcomes counted, decided once a window is full."""
        return self.model_copy(
            update={"succeeded": self.succeeded + succeeded, "failed": self.failed + failed}
        )._judged()

    def observe(self, labeled: int, correct: int) -> GuardRecord:
        """This record with the labeled predictions counted anew (a count from the stores, not an increment),
        decided once a window is full."""
        return self.model_copy(update={"labeled": labeled, "correct": correct})._judged()

    def _judged(self) -> GuardRecord:
        """Rolling back as soon as one watched number is over its limit with a full window; passed once every
        watched number has a full window and none is; else still watching."""
        verdicts = [v for v in (self._error_verdict(), self._accuracy_verdict()) if v is not None]
        failing = [reason for bad, reason in verdicts if bad]
        if failing:
            state, reason = GuardState.ROLLING_BACK, "; ".join(failing)
        elif len(verdicts) == self.spec.checks:
            state, reason = GuardState.PASSED, "; ".join(reason for _, reason in verdicts)
        else:
            return self
        return self.model_copy(update={"state": state, "decided_at": now(), "reason": reason})

    def _error_verdict(self) -> tuple[bool, str] | None:
        limit = self.spec.error_rate
        if limit is None or self.counted < self.spec.window:
            return None
        share = self.failed / self.counted
        over = share > limit
        sign = ">" if over else "<="
        jobs = f"{self.failed} of {self.counted} jobs on version {self.to_version} failed"
        return over, f"{jobs} ({share:.1%} {sign} {limit:.1%})"

    def _accuracy_verdict(self) -> tuple[bool, str] | None:
        limit = self.spec.min_accuracy
        if limit is None or self.labeled < self.spec.window:
            return None
        accuracy = self.correct / self.labeled
        under = accuracy < limit
        sign = "<" if under else ">="
        return under, (
            f"accuracy {accuracy:.1%} on {self.labeled} labeled predictions of version {self.to_version} "
            f"({sign} {limit:.1%})"
        )


_Guards = TypeAdapter(dict[str, GuardRecord])


def new_guard_id() -> str:
    """A fresh id for a move (and the guard it starts)."""
    return uuid.uuid4().hex


def read_guards(store: ModelStore, name: str) -> dict[str, GuardRecord]:
    """The guard of each of ``name``'s aliases that has one (decided ones too), by alias."""
    return _parse(store, name, store.read_document(name, GUARDS_FILE))


def replace_guard(store: ModelStore, name: str, alias: str, record: GuardRecord | None) -> None:
    """Make ``record`` the guard of ``alias`` (``None``: no guard): every move replaces the last one's."""

    def change(raw: bytes | None) -> bytes | None:
        guards = _parse(store, name, raw)
        if record is None:
            if alias not in guards:
                return None
            guards.pop(alias)
        else:
            guards[alias] = record
        return _Guards.dump_json(guards)

    store.update_document(name, GUARDS_FILE, change)


def contribute(
    store: ModelStore, name: str, alias: str, guard_id: str, succeeded: int, failed: int
) -> tuple[bool, GuardRecord | None]:
    """Add outcomes to the guard ``guard_id`` of ``alias``, atomically. Returns whether they were counted
    (not when the guard was replaced or decided meanwhile) and, when this very update decided the guard,
    the decided record: only one caller ever gets it."""
    return _update(store, name, alias, guard_id, lambda record: record.add(succeeded, failed))


def observe_accuracy(
    store: ModelStore, name: str, alias: str, guard_id: str, labeled: int, correct: int
) -> GuardRecord | None:
    """Record the guarded version's labeled and right predictions, counted just now from the stores, in the
    guard ``guard_id`` of ``alias``, atomically (nothing is written when they did not change). Returns the
    decided record when this very update decided the guard: only one caller ever gets it."""

    def step(record: GuardRecord) -> GuardRecord | None:
        if (record.labeled, record.correct) == (labeled, correct):
            return None
        return record.observe(labeled, correct)

    return _update(store, name, alias, guard_id, step)[1]


def _update(
    store: ModelStore, name: str, alias: str, guard_id: str, step: Callable[[GuardRecord], GuardRecord | None]
) -> tuple[bool, GuardRecord | None]:
    """Apply ``step`` to the watching guard ``guard_id`` of ``alias`` by compare-and-swap (``None``: leave
    it); whether it was applied, and the record if that decided the guard."""
    outcome: list[tuple[bool, GuardRecord | None]] = []

    def change(raw: bytes | None) -> bytes | None:
        outcome.clear()  # NOTE: runs again after a lost compare-and-swap: only the last run counts
        guards = _parse(store, name, raw)
        record = guards.get(alias)
        updated = None
        if record is not None and record.id == guard_id and record.state is GuardState.WATCHING:
            updated = step(record)
        if updated is None:
            outcome.append((False, None))
            return None
        guards[alias] = updated
        outcome.append((True, updated if updated.state is not GuardState.WATCHING else None))
        return _Guards.dump_json(guards)

    store.update_document(name, GUARDS_FILE, change)
    return outcome[0]


def roll_back(store: ModelStore, name: str, record: GuardRecord) -> bool:
    """Carry out a guard's decision to roll back: the alias returns to the version it had, if it still
    points at the guarded one, the move is recorded, and the guard is marked done. Every step may run
    again (a worker that died half-way is finished for by another): the result is the same. Returns
    whether the alias was moved."""
    current = read_guards(store, name).get(record.alias)
    if current is None or current.id != record.id or current.state is not GuardState.ROLLING_BACK:
        return False  # finished already, or replaced by a later move: nothing to carry out
    moved: list[bool] = []

    def back(aliases: dict[str, int]) -> dict[str, int]:
        moved.clear()
        if aliases.get(record.alias) != record.to_version:
            moved.append(False)
            return aliases  # moved by someone since: theirs stands
        moved.append(True)
        return {**aliases, record.alias: record.from_version}

    store.update_aliases(name, back)
    if moved[0]:
        entry = AliasMove(
            id=f"{record.id}-rollback",
            at=now(),
            alias=record.alias,
            from_version=record.to_version,
            to_version=record.from_version,
            by=f"guard of move {record.id[:8]}",
            reason=f"rolled back: {record.reason}",
        )
        record_move(store, name, entry)
    _finish(store, name, record, GuardState.ROLLED_BACK)
    return moved[0]


def record_passed(store: ModelStore, name: str, record: GuardRecord) -> None:
    """Record in the history that a guard kept its alias where it was moved."""
    entry = AliasMove(
        id=f"{record.id}-kept",
        at=now(),
        alias=record.alias,
        from_version=record.to_version,
        to_version=record.to_version,
        by=f"guard of move {record.id[:8]}",
        reason=f"kept: {record.reason}",
    )
    record_move(store, name, entry)


def _finish(store: ModelStore, name: str, record: GuardRecord, state: GuardState) -> None:
    def change(raw: bytes | None) -> bytes | None:
        guards = _parse(store, name, raw)
        current = guards.get(record.alias)
        if current is None or current.id != record.id or current.state is state:
            return None  # replaced by a later move, or finished already
        guards[record.alias] = current.model_copy(update={"state": state})
        return _Guards.dump_json(guards)

    store.update_document(name, GUARDS_FILE, change)


def _parse(store: ModelStore, name: str, raw: bytes | None) -> dict[str, GuardRecord]:
    if raw is None:
        return {}
    try:
        return _Guards.validate_json(raw)
    except ValidationError:
        raise StoreError(f"corrupt alias guards of {name!r} in {store.describe()}") from None
