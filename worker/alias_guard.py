"""A worker's share of guarding alias moves: count the outcomes of jobs that resolved a guarded alias to its
new version, and add them to the guard's shared count in the model store.

Counting is per unit of work on the processing thread, from the results just stored, against the guards in
the registry's last view of the store (no I/O). Adding the counts to the store, and the rollback the adding
may decide, run on a thread of their own, started the first time there is something to add: the
processing thread never waits on the model store. Counts that pile up while a write is under way go out
together in the next one, so a busy worker writes once per store round trip, not once per job.

A guard on accuracy is judged by the same thread, every ``ACCURACY_CHECK_S``, whether or not jobs are
running: labels arrive through ``inferq labels submit`` days later, and a label that came first is joined
only when its prediction is stored, so neither event alone sees every change. Each worker that has the
guard in its view counts the guarded version's labeled predictions (the labels joined with the results in
the result store) and records the count in the guard with the store's compare-and-swap; the update that
brings it to the window decides, so exactly one worker rolls back, logs it and counts it.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from inferq.model_store.guard import (
    GuardRecord,
    GuardState,
    contribute,
    observe_accuracy,
    record_passed,
    roll_back,
)
from inferq.model_store.registry import Registry
from inferq.monitoring.performance import guard_accuracy
from inferq.shared.config.logging import get_logger
from inferq.shared.contract.messages import LATEST, Result, Status
from inferq.shared.errors import StoreError, StoreUnreachable
from inferq.shared.results.labels import LabelStore

log = get_logger(__name__)
RETRY_S = 1.0
"""How soon counts the model store did not take are offered again."""
STALE_ROLLBACK_S = 10.0
"""A rollback decided this long ago and not finished (its worker died half-way) is finished by another."""
ACCURACY_CHECK_S = 5.0
"""How often a worker counts the labeled predictions of the guards on accuracy in its view."""
EXIT_SETTLE_S = 5.0
"""How long a process that exits waits for its last counts to reach the store."""

_Key = tuple[str, str, str]
"""A guard's model, alias and id."""


class AliasGuards:
    """Counts jobs of guarded aliases and adds them to the shared guard count (see the module docstring)."""

    def __init__(
        self, registry: Registry[Any], worker_name: str, labels: Callable[[], LabelStore] | None = None
    ) -> None:
        self.registry = registry
        self.worker_name = worker_name
        self._labels = labels  # the result store's labels, for guards on accuracy
        self._accuracy_checked_at = float("-inf")
        self._pending: dict[_Key, list[int]] = {}  # guard → [succeeded, failed] not yet in the store
        self._busy = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self.rollbacks = 0
        """Rollbacks this process carried out."""

    # -- the processing thread ----------------------------------------------------------------------

    def tally(self, results: Iterable[Result]) -> None:
        """Count ``results`` (stored just now, each once) that answer jobs resolved through a guarded alias
        to the guarded version; hand the counts to the background thread. No I/O."""
        guards = self.registry.guards()
        if not guards:
            return  # the usual case: nothing guarded, nothing to look at
        counts: dict[_Key, list[int]] = {}
        for result in results:
            ref = result.requested_version
            if not isinstance(ref, str) or ref == LATEST or result.model is None or result.version is None:
                continue
            guard = self.registry.guard(result.model, ref)
            if guard is None or guard.state is not GuardState.WATCHING or guard.to_version != result.version:
                continue
            tally = counts.setdefault((result.model, ref, guard.id), [0, 0])
            tally[0 if result.status is Status.SUCCEEDED else 1] += 1
        stale = [g for g in guards if _stale_rollback(g[1])]
        if counts or stale:
            self._hand_over(counts)
        elif any(_watches_accuracy(record) for _, record in guards):
            with self._changed:
                self._start()  # it looks at the labels every ACCURACY_CHECK_S from now on

    def _hand_over(self, counts: dict[_Key, list[int]]) -> None:
        with self._changed:
            for key, (succeeded, failed) in counts.items():
                tally = self._pending.setdefault(key, [0, 0])
                tally[0] += succeeded
                tally[1] += failed
            self._changed.notify_all()
            self._start()

    def _start(self) -> None:
        """Start the background thread, once (called with ``_changed`` held)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="inferq-alias-guard", daemon=True)
            self._thread.start()
            # A worker that exits (drain mode, a stop) hands its last counts over first.
            atexit.register(self.settle, EXIT_SETTLE_S)

    def settle(self, timeout_s: float) -> bool:
        """Wait until every count handed over is in the store (or could not be, for now); True if so."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    # -- the background thread ----------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            pending = self._next()
            kept = self._contribute_all(pending) if pending else {}
            self._finish_stale_rollbacks()
            self._check_accuracy()
            with self._changed:
                for key, (succeeded, failed) in kept.items():  # the store did not take them: offered again
                    tally = self._pending.setdefault(key, [0, 0])
                    tally[0] += succeeded
                    tally[1] += failed
                self._busy = False
                self._changed.notify_all()
            if kept:
                time.sleep(RETRY_S)

    def _next(self) -> dict[_Key, list[int]]:
        """The counts handed over since the last write (waiting for some, or for the next look at stale
        rollbacks)."""
        with self._changed:
            if not self._pending:
                self._changed.wait(min(STALE_ROLLBACK_S, ACCURACY_CHECK_S))
            pending, self._pending = self._pending, {}
            self._busy = True
            return pending

    def _contribute_all(self, pending: dict[_Key, list[int]]) -> dict[_Key, list[int]]:
        """Add every guard's counts to the store; returns those it did not take."""
        kept: dict[_Key, list[int]] = {}
        for (model, alias, guard_id), (succeeded, failed) in pending.items():
            try:
                _, decided = contribute(self.registry.store, model, alias, guard_id, succeeded, failed)
                if decided is not None:
                    self._carry_out(model, decided)
            except (StoreUnreachable, StoreError) as exc:
                log.warning("alias_guard_store_unavailable", model=model, alias=alias, error=str(exc))
                kept[(model, alias, guard_id)] = [succeeded, failed]
            except Exception as exc:  # a bug must not end the thread: these counts are dropped, not retried
                log.error("alias_guard_failed", model=model, alias=alias, error=f"{type(exc).__name__}: {exc}")
        return kept

    def _carry_out(self, model: str, record: GuardRecord) -> None:
        """This worker's update decided ``record``: roll the alias back, or record that it stays."""
        if record.state is GuardState.PASSED:
            log.info(
                "alias_guard_passed", model=model, alias=record.alias, version=record.to_version, reason=record.reason
            )
            record_passed(self.registry.store, model, record)
            return
        self._roll_back(model, record)

    def _roll_back(self, model: str, record: GuardRecord) -> None:
        if not roll_back(self.registry.store, model, record):
            return
        self.rollbacks += 1
        log.warning(
            "alias_rolled_back",
            model=model,
            alias=record.alias,
            from_version=record.to_version,
            to_version=record.from_version,
            reason=record.reason,
            worker=self.worker_name,
        )
        self.registry.alias_rolled_back(model, record.alias)

    def _finish_stale_rollbacks(self) -> None:
        """Finish rollbacks decided long ago and never finished (the deciding worker died half-way)."""
        for model, record in self.registry.guards():
            if _stale_rollback(record):
                try:
                    self._roll_back(model, record)
                except (StoreUnreachable, StoreError) as exc:
                    log.warning("alias_guard_store_unavailable", model=model, alias=record.alias, error=str(exc))

    def _check_accuracy(self) -> None:
        """Count the labeled predictions of every guard on accuracy in the view (at most every
        ``ACCURACY_CHECK_S``) and record them; carry out the decision if this worker's update made it."""
        watched = [(model, record) for model, record in self.registry.guards() if _watches_accuracy(record)]
        if not watched or self._labels is None or time.monotonic() - self._accuracy_checked_at < ACCURACY_CHECK_S:
            return
        self._accuracy_checked_at = time.monotonic()
        labels = self._labels()
        for model, record in watched:
            try:
                self._judge_accuracy(labels, model, record)
            except (StoreUnreachable, StoreError) as exc:
                log.warning("alias_guard_store_unavailable", model=model, alias=record.alias, error=str(exc))
            except Exception as exc:  # a bug must not end the thread: the next check tries again
                log.error("alias_guard_failed", model=model, alias=record.alias, error=f"{type(exc).__name__}: {exc}")

    def _judge_accuracy(self, labels: LabelStore, model: str, record: GuardRecord) -> None:
        store = self.registry.store
        labeled, correct = guard_accuracy(
            store, labels, model, record.alias, record.to_version, record.started_at.timestamp()
        )
        decided = observe_accuracy(store, model, record.alias, record.id, labeled, correct)
        if decided is not None:
            self._carry_out(model, decided)


def _watches_accuracy(record: GuardRecord) -> bool:
    return record.state is GuardState.WATCHING and record.spec.min_accuracy is not None


def _stale_rollback(record: GuardRecord) -> bool:
    decided = record.decided_at
    return (
        record.state is GuardState.ROLLING_BACK
        and decided is not None
        and (datetime.now(UTC) - decided).total_seconds() > STALE_ROLLBACK_S
    )
