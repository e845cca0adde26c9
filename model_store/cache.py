"""Verified model bytes, fetched once per version into a local directory shared by the host's workers.

``<cache>/<model>/<version>/<sha256>.onnx``: named by content, so a file is either the exact bytes the
manifest describes or it is not used. Files appear by rename from a temporary name in the same
directory, so processes sharing the cache never see (or leave) a partial file; a file enters the cache
only after it was verified and loaded, so a bad version is never cached.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from inferq.model_store.base import ModelStore, check_name
from inferq.model_store.manifest import Manifest, verify_model
from inferq.shared.config.logging import get_logger
from inferq.shared.errors import ModelLoadError

log = get_logger(__name__)


class ModelCache:
    """Reads model versions through an optional local cache, verifying every byte against the manifest."""

    def __init__(self, root: str | Path | None, max_model_bytes: int) -> None:
        self.root = Path(root) if root else None
        self.max_model_bytes = max_model_bytes

    def _path(self, manifest: Manifest) -> Path | None:
        if self.root is None:
            return None
        return self.root / check_name(manifest.name) / str(manifest.version) / f"{manifest.sha256}.onnx"

    def fetch(self, store: ModelStore, manifest: Manifest) -> tuple[bytes, bool]:
        """Verified bytes of ``manifest``'s version and whether they came from the cache."""
        if manifest.size_bytes > self.max_model_bytes:
            raise ModelLoadError(
                f"model {manifest.name!r} version {manifest.version} is {manifest.size_bytes} bytes, above "
                f"INFERQ_MAX_MODEL_BYTES={self.max_model_bytes}: refused"
            )
        cached = self._read_cached(manifest)
        if cached is not None:
            return cached, True
        # At most the manifest's size: anything bigger cannot match it, and is not downloaded.
        data = store.read_model(manifest.name, manifest.version, max_bytes=manifest.size_bytes)
        verify_model(manifest, data)
        return data, False

    def _read_cached(self, manifest: Manifest) -> bytes | None:
        path = self._path(manifest)
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            verify_model(manifest, data)
        except ModelLoadError as exc:
            # Damaged on disk since it was cached: drop it and fetch again from the store.
            log.warning("model_cache_discarded", model=manifest.name, version=manifest.version, error=str(exc))
            self.discard(manifest)
            return None
        return data

    def keep(self, manifest: Manifest, data: bytes) -> None:
        """Put verified, loadable ``data`` into the cache (atomically; a failure only costs a re-fetch)."""
        path = self._path(manifest)
        if path is None or path.exists():
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".download-", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)  # atomic: other processes see no file or the whole file
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.warning("model_cache_write_failed", model=manifest.name, version=manifest.version, error=str(exc))

    def discard(self, manifest: Manifest) -> None:
        """Remove ``manifest``'s version from the cache, if there."""
        path = self._path(manifest)
        if path is not None:
            path.unlink(missing_ok=True)
