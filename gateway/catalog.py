"""The models as the gateway sees them: version resolution with the workers' bounded staleness, and
manifests, cached for good (a published version never changes). The gateway never loads a model."""

from __future__ import annotations

import threading

from inferq.model_store.base import ModelStore
from inferq.model_store.manifest import Manifest
from inferq.model_store.registry import Registry
from inferq.shared.contract.messages import VersionRef, is_valid_name
from inferq.shared.errors import ModelLoadError, UnknownModel

MAX_CACHED_MANIFESTS = 4096


def _never_loads(manifest: Manifest, _data: bytes) -> Manifest:
    raise ModelLoadError(f"the gateway does not load models ({manifest.name} v{manifest.version})")


class Catalog:
    """Resolves ``latest`` and aliases (seen within ``refresh_s`` of a change) and reads manifests."""

    def __init__(self, store: ModelStore, refresh_s: float) -> None:
        self.store = store
        self._registry: Registry[Manifest] = Registry(store, _never_loads, refresh_s=refresh_s)
        self._manifests: dict[tuple[str, int], Manifest] = {}
        self._lock = threading.Lock()

    def manifest(self, name: str, ref: VersionRef) -> Manifest:
        """The manifest of the version ``ref`` names now; raises :class:`UnknownModel`,
        :class:`UnknownVersion`, or ``StoreUnreachable`` / :class:`ModelLoadError` when the store fails."""
        if not is_valid_name(name):
            raise UnknownModel(f"no model named {name!r}")
        try:
            version = self._registry.resolve(name, ref)
        except UnknownModel:
            raise UnknownModel(f"no model named {name!r}") from None  # without the store's location
        key = (name, version)
        with self._lock:
            manifest = self._manifests.get(key)
        if manifest is None:
            manifest = self.store.read_manifest(name, version)
            with self._lock:
                if len(self._manifests) >= MAX_CACHED_MANIFESTS:
                    self._manifests.clear()
                self._manifests[key] = manifest
        return manifest

    def versions(self, name: str) -> list[int]:
        """Published versions of ``name``, ascending; raises :class:`UnknownModel` when there are none."""
        versions = self.store.list_versions(name) if is_valid_name(name) else []
        if not versions:
            raise UnknownModel(f"no model named {name!r}")
        return versions
