"""Model versions for the processing thread, without ever waiting on the model store.

Resolving ``latest`` or an alias and loading a version read the model store (S3: LIST and GET, with
30 s read timeouts and retries). Neither the I/O thread (heartbeats) nor the processing thread (every
other model's jobs) may wait for that, so it happens on a thread of its own: a batch whose model is
not known or not loaded yet is held, the fetch runs meanwhile, and its jobs are tried again as soon
as it finished (or failed for good: then they get that error as their result).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from inferq.model_store.manifest import Manifest
from inferq.model_store.registry import Registry
from inferq.shared.config.logging import get_logger
from inferq.shared.contract.messages import VersionRef
from inferq.shared.errors import JobError, StoreUnreachable
from inferq.worker.runner import LoadedModel

log = get_logger(__name__)
ERROR_KEPT_S = 1.0
"""How long a permanent error (unknown model, bad version) answers jobs before the store is asked again."""
REFRESH_WAIT_S = 1.0
"""How long jobs wait for a due refresh of ``latest`` and aliases (so a moved alias is seen within the
refresh interval) before the last view serves them anyway (the store is slow or silent). A refresh that
finished after they started waiting serves them at once, even if the view is due again already (a
refresh interval of 0 makes every view due)."""
REFRESH_AHEAD = 0.2
"""A view of ``latest`` and aliases is renewed in the background once it is this share of the refresh
interval from due, and serves jobs meanwhile: with a store that answers in time, no job ever waits for a
refresh (an S3 LIST takes tens of milliseconds, every interval)."""

Key = tuple[str, VersionRef]
Ready = tuple[int, Manifest, LoadedModel]


class ModelFetcher:
    """Looks up models without I/O; fetches what is missing on a background thread."""

    def __init__(self, registry: Registry[LoadedModel], on_fetched: Callable[[], None] = lambda: None) -> None:
        self.registry = registry
        self.on_fetched = on_fetched
        self._wanted: queue.SimpleQueue[Key] = queue.SimpleQueue()
        self._fetching: dict[Key, float] = {}  # key → when its fetch was asked for
        self._errors: dict[Key, tuple[JobError, float]] = {}
        self._held: dict[Key, float] = {}  # key → since when its jobs wait for a refresh
        self._refreshed: dict[str, float] = {}  # model → when its last fetch finished
        self._lock = threading.Lock()
        self._ahead_s = registry.refresh_s * REFRESH_AHEAD
        self.fetched = 0
        """Fetches finished so far (each one is followed by ``on_fetched``)."""
        threading.Thread(target=self._fetch_forever, name="inferq-models", daemon=True).start()

    def lookup(self, name: str, ref: VersionRef) -> Ready | None:
        """The concrete version and loaded model for ``ref``, or ``None`` while it is being fetched.
        Raises the :class:`JobError` that fetching it ran into (unknown model, load failure)."""
        with self._lock:
            failed = self._errors.get((name, ref))
        if failed is not None and time.monotonic() - failed[1] < ERROR_KEPT_S:
            raise failed[0]
        if self.registry.needs_refresh(name, ahead_s=self._ahead_s):
            self._fetch((name, ref))
            if self.registry.needs_refresh(name) and self._waits_for_refresh((name, ref)):
                return None  # a refresh is due: wait for it a little (bounded staleness), not for ever
        with self._lock:
            self._held.pop((name, ref), None)
        version = self.registry.known_version(name, ref)
        loaded = self.registry.loaded_model(name, version) if version is not None else None
        if version is None or loaded is None:
            self._fetch((name, ref))
            return None
        manifest, model = loaded
        return version, manifest, model

    def _waits_for_refresh(self, key: Key) -> bool:
        """Whether jobs of ``key`` wait for a due refresh: until one finished after they began waiting,
        for at most ``REFRESH_WAIT_S``. (Without any view of the model they wait for it anyway.)

        NOTE: measured from when the jobs were first held, not from when the current fetch was asked for:
        each finished fetch asks for the next while a view is due, so with a refresh interval of 0 the
        latter would restart at every fetch and hold the jobs for ever. The mark is dropped when the jobs
        are served, so the next due refresh is waited for afresh."""
        if self.resolved(*key) is None:
            return False  # nothing to serve from yet: the jobs wait for the model to be fetched
        now = time.monotonic()
        with self._lock:
            held = self._held.setdefault(key, now)
            refreshed = self._refreshed.get(key[0], float("-inf")) >= held
        return not refreshed and now - held < REFRESH_WAIT_S

    def resolved(self, name: str, ref: VersionRef) -> int | None:
        """The version ``ref`` names in the last view of the store (no I/O), or ``None`` when unknown."""
        try:
            return self.registry.known_version(name, ref)
        except JobError:
            return None

    def _fetch(self, key: Key) -> float:
        """Ask for ``key`` to be fetched (once at a time); returns for how long it has been asked."""
        now = time.monotonic()
        with self._lock:
            since = self._fetching.get(key)
            if since is not None:
                return now - since
            self._fetching[key] = now
        self._wanted.put(key)
        return 0.0

    def _fetch_forever(self) -> None:
        while True:
            key = self._wanted.get()
            try:
                self._fetch_one(key)
            finally:
                with self._lock:
                    self._fetching.pop(key, None)
                    self._refreshed[key[0]] = time.monotonic()
                    self.fetched += 1
                self.on_fetched()

    def _fetch_one(self, key: Key) -> None:
        name, ref = key
        try:
            version = self.registry.resolve(name, ref, ahead_s=self._ahead_s)
            self.registry.get(name, version)
        except JobError as error:
            with self._lock:
                self._errors[key] = (error, time.monotonic())
        except StoreUnreachable as exc:
            log.warning("model_store_unreachable", model=name, version=str(ref), error=str(exc))
        except Exception as exc:  # a bug must not end the thread: the jobs stay held and are retried
            log.error("model_fetch_failed", model=name, version=str(ref), error=f"{type(exc).__name__}: {exc}")
        else:
            with self._lock:
                self._errors.pop(key, None)
