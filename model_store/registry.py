"""The registry: resolves ``latest`` and aliases with a bounded staleness, and keeps loaded models
cached by ``(name, version)`` with a bound on how many stay loaded.

A moved alias or a new version is seen within ``refresh_s``; the new version is then loaded beside the
ones already loaded (they keep serving the jobs resolved to them) and the least recently used model is
evicted past ``max_loaded``. When the store cannot be reached, resolution goes on from the last view
it had (and tries the store again after ``refresh_s``), so an outage never fails or crashes anything.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from inferq.model_store.base import ModelStore
from inferq.model_store.cache import ModelCache
from inferq.model_store.guard import GuardRecord, GuardState, read_guards
from inferq.model_store.manifest import Manifest
from inferq.shared.broker.amqp import Backoff
from inferq.shared.config.logging import get_logger
from inferq.shared.contract.messages import LATEST, VersionRef
from inferq.shared.errors import JobError, ModelLoadError, StoreError, StoreUnreachable, UnknownModel, UnknownVersion

log = get_logger(__name__)

M = TypeVar("M")
FORCED_REFRESH_MIN_S = 1.0
DEFAULT_MAX_MODEL_BYTES = 1 << 30


@dataclass(frozen=True, slots=True)
class _Catalog:
    versions: frozenset[int]
    latest: int | None
    aliases: dict[str, int]
    fetched_at: float
    guards: dict[str, GuardRecord] = field(default_factory=dict)
    """Guards not finished yet (watching, or rolling back), by alias."""


class Registry(Generic[M]):
    """Version resolution and a bounded LRU of loaded models, over any :class:`ModelStore`.

    ``loader`` turns a verified manifest and model bytes into a runnable model (the worker passes
    its onnxruntime loader), so this module never imports the runtime.
    """

    def __init__(
        self,
        store: ModelStore,
        loader: Callable[[Manifest, bytes], M],
        *,
        max_loaded: int = 8,
        refresh_s: float = 5.0,
        cache: ModelCache | None = None,
        load_retry_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self._loader = loader
        self._max_loaded = max_loaded
        self._refresh_s = refresh_s
        self._cache = cache if cache is not None else ModelCache(None, DEFAULT_MAX_MODEL_BYTES)
        self._load_retry_s = load_retry_s
        self._clock = clock
        self._catalogs: dict[str, _Catalog] = {}
        self._loaded: OrderedDict[tuple[str, int], tuple[Manifest, M]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def refresh_s(self) -> float:
        """How old a view of the versions and aliases may be when a job is resolved with it."""
        return self._refresh_s

    def resolve(self, name: str, ref: VersionRef, *, ahead_s: float = 0.0) -> int:
        """The concrete version ``ref`` names, from a view of the store no older than ``refresh_s``
        (renewed already ``ahead_s`` before that)."""
        catalog = self._catalog(name, max_age_s=self._refresh_s - ahead_s)
        try:
            return self._lookup(catalog, name, ref)
        except (UnknownModel, UnknownVersion):
            # Perhaps published since the last look: look again before failing the job, but at most
            # once a second, so a flood of jobs for a missing model does not hammer the store.
            fresher = self._catalog(name, max_age_s=min(self._refresh_s, FORCED_REFRESH_MIN_S))
            if fresher is catalog:
                raise
            return self._lookup(fresher, name, ref)

    def needs_refresh(self, name: str, *, ahead_s: float = 0.0) -> bool:
        """True when the view of ``name`` is missing or older than ``refresh_s`` (:meth:`resolve` renews it),
        or will be within ``ahead_s``."""
        cached = self._catalogs.get(name)
        return cached is None or self._clock() - cached.fetched_at >= self._refresh_s - ahead_s

    def known_version(self, name: str, ref: VersionRef) -> int | None:
        """The version ``ref`` names in the last view of the store, without asking the store; ``None``
        when there is no view of ``name`` yet. Raises :class:`UnknownModel` / :class:`UnknownVersion`
        when a view younger than a second says so (an older one may be outdated: ``None``)."""
        cached = self._catalogs.get(name)
        if cached is None:
            return None
        age = self._clock() - cached.fetched_at
        try:
            return self._lookup(cached, name, ref)
        except (UnknownModel, UnknownVersion):
            if age >= min(self._refresh_s, FORCED_REFRESH_MIN_S):
                return None  # perhaps published since: let resolve() look again
            raise

    def loaded_model(self, name: str, version: int) -> tuple[Manifest, M] | None:
        """The model if it is loaded now (no store access); ``None`` otherwise."""
        with self._lock:
            loaded = self._loaded.get((name, version))
            if loaded is not None:
                self._loaded.move_to_end((name, version))
            return loaded

    def _catalog(self, name: str, *, max_age_s: float) -> _Catalog:
        cached = self._catalogs.get(name)
        now = self._clock()
        if cached is not None and now - cached.fetched_at < max_age_s:
            return cached
        try:
            versions = self.store.list_versions(name)
            aliases = self.store.read_aliases(name) if versions else {}
            guards = self._open_guards(name) if aliases else {}
        except (StoreUnreachable, StoreError) as exc:
            return self._stale(name, cached, now, exc)
        catalog = _Catalog(frozenset(versions), versions[-1] if versions else None, aliases, now, guards)
        self._catalogs[name] = catalog
        return catalog

    def _open_guards(self, name: str) -> dict[str, GuardRecord]:
        try:
            guards = read_guards(self.store, name)
        except StoreError as exc:  # a damaged guard file must not stop jobs: those aliases go unguarded
            log.error("alias_guards_unreadable", model=name, error=str(exc))
            return {}
        done = (GuardState.PASSED, GuardState.ROLLED_BACK)
        return {alias: g for alias, g in guards.items() if g.state not in done}

    def guard(self, name: str, alias: str) -> GuardRecord | None:
        """The unfinished guard of ``alias`` in the last view of the store (no store access), if any."""
        cached = self._catalogs.get(name)
        return None if cached is None else cached.guards.get(alias)

    def guards(self) -> list[tuple[str, GuardRecord]]:
        """Every unfinished guard in the last views of the store, with its model (no store access)."""
        return [(name, g) for name, catalog in list(self._catalogs.items()) for g in catalog.guards.values()]

    def forget(self, name: str) -> None:
        """Drop the view of ``name``: the next resolution reads the store (after an alias moved from here)."""
        self._catalogs.pop(name, None)

    def alias_rolled_back(self, name: str, alias: str) -> None:
        """A guard of this process moved ``alias`` back: resolve from the store again at once."""
        self.forget(name)

    def _stale(self, name: str, cached: _Catalog | None, now: float, exc: OSError | StoreError) -> _Catalog:
        """The last view of ``name`` when the store failed; it is looked at again after ``refresh_s``,
        not on every job. Without any view, an unreachable store is raised for the caller to retry."""
        if cached is None:
            if isinstance(exc, StoreError):
                raise ModelLoadError(f"cannot read model {name!r} from {self.store.describe()}: {exc}") from None
            raise exc
        log.warning("model_store_unreachable", model=name, error=str(exc), serving="last known versions and aliases")
        stale = _Catalog(cached.versions, cached.latest, cached.aliases, now, cached.guards)
        self._catalogs[name] = stale
        return stale

    def _lookup(self, catalog: _Catalog, name: str, ref: VersionRef) -> int:
        if catalog.latest is None:
            raise UnknownModel(f"no model named {name!r} in {self.store.describe()}")
        if isinstance(ref, int):
            if ref not in catalog.versions:
                raise UnknownVersion(f"model {name!r} has no version {ref} (latest is {catalog.latest})")
            return ref
        if ref == LATEST:
            return catalog.latest
        if ref not in catalog.aliases:
            known = ", ".join(sorted(catalog.aliases)) or "none"
            raise UnknownVersion(f"model {name!r} has no alias {ref!r} (aliases: {known})")
        return catalog.aliases[ref]

    def get(self, name: str, version: int) -> tuple[Manifest, M]:
        """The loaded model, loading and verifying it on first use; evicts the least recently used."""
        key = (name, version)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
        loaded = self._load(name, version)
        with self._lock:
            self._loaded[key] = loaded
            while len(self._loaded) > self._max_loaded:
                self._loaded.popitem(last=False)
        return loaded

    def loaded(self) -> list[tuple[str, int]]:
        """Keys of the models loaded now, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def _load(self, name: str, version: int) -> tuple[Manifest, M]:
        """Fetch (through the cache), verify and load; retries an unreachable store for ``load_retry_s``."""
        backoff = Backoff(cap_s=2.0)
        deadline = time.monotonic() + self._load_retry_s
        while True:
            try:
                manifest = self.store.read_manifest(name, version)
                data, cached = self._cache.fetch(self.store, manifest)
                break
            except StoreUnreachable as exc:
                if time.monotonic() >= deadline:
                    raise
                delay = backoff.next_delay()
                log.warning("model_store_unreachable", model=name, version=version, error=str(exc), retry_in_s=delay)
                time.sleep(delay)
            except StoreError as exc:  # e.g. access denied, a corrupt manifest: retrying will not help
                raise ModelLoadError(f"model {name!r} version {version}: {exc}") from None
        try:
            loaded = self._loader(manifest, data)
        except Exception as exc:  # the runtime rejects bad graphs with many error types
            self._cache.discard(manifest)
            if isinstance(exc, JobError):
                raise
            raise ModelLoadError(f"model {name!r} version {version} failed to load: {exc}") from None
        if not cached:
            self._cache.keep(manifest, data)
        log.info("model_loaded", model=name, version=version, sha256=manifest.sha256[:12], from_cache=cached)
        return manifest, loaded
