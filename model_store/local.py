"""A model store on a local (or mounted) file system."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
from pydantic import ValidationError

from inferq.model_store.base import ALIASES_FILE, MANIFEST_FILE, MODEL_FILE, SHADOW_FILE, check_document, check_name
from inferq.model_store.manifest import Manifest
from inferq.shared.errors import ModelLoadError, StoreError, UnknownModel, UnknownVersion, VersionExists


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalModelStore:
    """``<root>/<model>/<N>/model.onnx`` + ``manifest.json``, ``<root>/<model>/aliases.json``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return str(self.root)

    def _model_dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def list_models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.list_versions(p.name))

    def list_versions(self, name: str) -> list[int]:
        model_dir = self._model_dir(name)
        if not model_dir.is_dir():
            return []
        return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / MANIFEST_FILE).is_file())

    def read_manifest(self, name: str, version: int) -> Manifest:
        path = self._model_dir(name) / str(version) / MANIFEST_FILE
        try:
            return Manifest.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            if not self.list_versions(name):
                raise UnknownModel(f"no model named {name!r} in {self.root}") from None
            raise UnknownVersion(f"model {name!r} has no version {version}") from None
        except ValidationError as exc:
            raise StoreError(f"corrupt manifest {path}: {exc.error_count()} problems") from None

    def read_model(self, name: str, version: int, *, max_bytes: int | None = None) -> bytes:
        path = self._model_dir(name) / str(version) / MODEL_FILE
        try:
            with path.open("rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if max_bytes is not None and size > max_bytes:
                    raise ModelLoadError(f"{path} is {size} bytes, above the limit of {max_bytes}")
                return handle.read()
        except FileNotFoundError:
            raise UnknownVersion(f"model {name!r} version {version} has no {MODEL_FILE}") from None

    def read_aliases(self, name: str) -> dict[str, int]:
        path = self._model_dir(name) / ALIASES_FILE
        try:
            raw = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except orjson.JSONDecodeError:
            raise StoreError(f"corrupt alias file {path}") from None
        return {str(k): int(v) for k, v in raw.items()}

    def update_aliases(self, name: str, change: Callable[[dict[str, int]], dict[str, int]]) -> None:
        model_dir = self._model_dir(name)
        with self._locked(model_dir):  # read and write under one lock: concurrent updates serialize
            aliases = change(self.read_aliases(name))
            _write_atomic(model_dir / ALIASES_FILE, orjson.dumps(aliases, option=orjson.OPT_SORT_KEYS))

    def read_shadow(self, name: str) -> bytes | None:
        try:
            return (self._model_dir(name) / SHADOW_FILE).read_bytes()
        except FileNotFoundError:
            return None

    def write_shadow(self, name: str, data: bytes | None) -> None:
        model_dir = self._model_dir(name)
        with self._locked(model_dir):
            if data is None:
                (model_dir / SHADOW_FILE).unlink(missing_ok=True)
            else:
                _write_atomic(model_dir / SHADOW_FILE, data)

    def read_document(self, name: str, document: str) -> bytes | None:
        try:
            return (self._model_dir(name) / check_document(document)).read_bytes()
        except FileNotFoundError:
            return None

    def update_document(self, name: str, document: str, change: Callable[[bytes | None], bytes | None]) -> None:
        model_dir = self._model_dir(name)
        path = model_dir / check_document(document)
        with self._locked(model_dir):  # the model's lock: read and write as one step for every process
            updated = change(self.read_document(name, document))
            if updated is not None:
                _write_atomic(path, updated)

    def put_version(self, manifest: Manifest, model_bytes: bytes) -> None:
        model_dir = self._model_dir(manifest.name)
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=".staging-"))
        try:
            (staging / MODEL_FILE).write_bytes(model_bytes)
            (staging / MANIFEST_FILE).write_bytes(manifest.model_dump_json(indent=2).encode())
            # A directory rename is atomic and fails when the target exists: two publishers of the
            # same number cannot both win, and a worker never sees half a version.
            try:
                os.rename(staging, model_dir / str(manifest.version))
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise VersionExists(
                        f"model {manifest.name!r} version {manifest.version} already exists; versions are immutable"
                    ) from None
                raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    @contextmanager
    def _locked(self, model_dir: Path) -> Iterator[None]:
        model_dir.mkdir(parents=True, exist_ok=True)
        with open(model_dir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
