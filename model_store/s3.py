"""A model store in S3 (or any S3-compatible server): the file store's layout under ``s3://bucket/prefix``.

Publishing a version is three writes, each conditional on the object not existing yet
(``If-None-Match: *``): a claim, the model, the manifest. The claim decides a race for a version
number before any file is written, so a losing publisher never overwrites the winner's model; the
manifest comes last, and readers treat a version without one as absent, so nobody sees half a version.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError

from inferq.model_store.base import ALIASES_FILE, MANIFEST_FILE, MODEL_FILE, SHADOW_FILE, check_document, check_name
from inferq.model_store.manifest import Manifest
from inferq.shared.contract.messages import is_valid_name
from inferq.shared.errors import ModelLoadError, StoreError, UnknownModel, UnknownVersion, VersionExists
from inferq.shared.s3.client import is_not_found, make_client, put_if, translate
from inferq.shared.s3.location import S3Location

CLAIM_FILE = ".claim"
ALIAS_UPDATE_ATTEMPTS = 20
_MANIFEST_KEY = re.compile(r"^(\d+)/" + re.escape(MANIFEST_FILE) + "$")


class S3ModelStore:
    """``s3://bucket/prefix/<model>/<N>/{model.onnx,manifest.json}`` and ``<model>/aliases.json``."""

    def __init__(self, location: S3Location, client: Any | None = None) -> None:
        self.location = location
        self._client = client if client is not None else make_client()
        self._conditional_writes_checked = False
        self._check_lock = threading.Lock()

    def describe(self) -> str:
        return str(self.location)

    def _key(self, name: str, *parts: str) -> str:
        return self.location.key(check_name(name), *parts)

    # -- reading ----------------------------------------------------------------------------------

    def _list(self, prefix: str, *, delimiter: str | None = None) -> tuple[list[str], list[str]]:
        """Keys and common prefixes under ``prefix``, every page."""
        keys: list[str] = []
        prefixes: list[str] = []
        kwargs: dict[str, Any] = {"Bucket": self.location.bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(**kwargs):
                keys.extend(item["Key"] for item in page.get("Contents", []))
                prefixes.extend(item["Prefix"] for item in page.get("CommonPrefixes", []))
        except Exception as exc:  # boto3 raises ClientError, BotoCoreError and urllib3 errors
            raise translate(exc, f"list s3://{self.location.bucket}/{prefix}") from None
        return keys, prefixes

    def list_models(self) -> list[str]:
        _, prefixes = self._list(self.location.prefix, delimiter="/")
        names = [p[len(self.location.prefix) :].rstrip("/") for p in prefixes]
        return sorted(n for n in names if is_valid_name(n) and self.list_versions(n))

    def list_versions(self, name: str) -> list[int]:
        base = self._key(name, "")
        keys, _ = self._list(base)
        versions = (_MANIFEST_KEY.match(k[len(base) :]) for k in keys)
        return sorted(int(m.group(1)) for m in versions if m)

    def _get(self, key: str, *, max_bytes: int | None = None) -> bytes | None:
        """The object's bytes, or ``None`` when it does not exist."""
        try:
            response = self._client.get_object(Bucket=self.location.bucket, Key=key)
            if max_bytes is not None and int(response.get("ContentLength", 0)) > max_bytes:
                response["Body"].close()
                raise ModelLoadError(
                    f"s3://{self.location.bucket}/{key} is {response['ContentLength']} bytes, "
                    f"above the limit of {max_bytes}"
                )
            data: bytes = response["Body"].read()
        except ModelLoadError:
            raise
        except Exception as exc:  # see _list
            if is_not_found(exc):
                return None
            raise translate(exc, f"get s3://{self.location.bucket}/{key}") from None
        return data

    def read_manifest(self, name: str, version: int) -> Manifest:
        key = self._key(name, str(version), MANIFEST_FILE)
        data = self._get(key)
        if data is None:
            if not self.list_versions(name):
                raise UnknownModel(f"no model named {name!r} in {self.location}")
            raise UnknownVersion(f"model {name!r} has no version {version}")
        try:
            return Manifest.model_validate_json(data)
        except ValidationError as exc:
            raise StoreError(
                f"corrupt manifest s3://{self.location.bucket}/{key}: {exc.error_count()} problems"
            ) from None

    def read_model(self, name: str, version: int, *, max_bytes: int | None = None) -> bytes:
        data = self._get(self._key(name, str(version), MODEL_FILE), max_bytes=max_bytes)
        if data is None:
            raise UnknownVersion(f"model {name!r} version {version} has no {MODEL_FILE}")
        return data

    def read_aliases(self, name: str) -> dict[str, int]:
        return self._read_aliases(name)[0]

    def _read_aliases(self, name: str) -> tuple[dict[str, int], str | None]:
        """The aliases of ``name`` and the ETag of their object (``None`` when there is none)."""
        key = self._key(name, ALIASES_FILE)
        try:
            response = self._client.get_object(Bucket=self.location.bucket, Key=key)
            data, etag = response["Body"].read(), str(response["ETag"])
        except Exception as exc:  # see _list
            if is_not_found(exc):
                return {}, None
            raise translate(exc, f"get s3://{self.location.bucket}/{key}") from None
        try:
            raw = orjson.loads(data)
            return {str(k): int(v) for k, v in raw.items()}, etag
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            raise StoreError(f"corrupt alias file s3://{self.location.bucket}/{key}") from None

    # -- writing ----------------------------------------------------------------------------------

    def _put(self, key: str, body: bytes, *, if_absent: bool, content_type: str, if_match: str | None = None) -> bool:
        """Write one object; with ``if_absent``, only if no object has that key, with ``if_match`` only if
        the object still has that ETag (False when the condition did not hold)."""
        return put_if(
            self._client, self.location.bucket, key, body, if_none_match=if_absent, if_match=if_match,
            content_type=content_type,
        )  # fmt: skip

    def update_aliases(self, name: str, change: Callable[[dict[str, int]], dict[str, int]]) -> None:
        # Optimistic concurrency: write only over the object we read (If-Match its ETag, or
        # If-None-Match when there was none); if another update got in between, read again.
        key = self._key(name, ALIASES_FILE)
        for _ in range(ALIAS_UPDATE_ATTEMPTS):
            current, etag = self._read_aliases(name)
            body = orjson.dumps(change(current), option=orjson.OPT_SORT_KEYS)
            if self._put(key, body, if_absent=etag is None, if_match=etag, content_type="application/json"):
                return
        raise StoreError(f"aliases of {name!r} kept changing under {ALIAS_UPDATE_ATTEMPTS} attempts; retry")

    def read_document(self, name: str, document: str) -> bytes | None:
        return self._read_document(self._key(name, check_document(document)))[0]

    def _read_document(self, key: str) -> tuple[bytes | None, str | None]:
        """The object's bytes and ETag, or ``(None, None)`` when it does not exist."""
        try:
            response = self._client.get_object(Bucket=self.location.bucket, Key=key)
            return response["Body"].read(), str(response["ETag"])
        except Exception as exc:  # see _list
            if is_not_found(exc):
                return None, None
            raise translate(exc, f"get s3://{self.location.bucket}/{key}") from None

    def update_document(self, name: str, document: str, change: Callable[[bytes | None], bytes | None]) -> None:
        # As update_aliases: written If-Match the ETag read (If-None-Match when absent), read again on a loss.
        key = self._key(name, check_document(document))
        for _ in range(ALIAS_UPDATE_ATTEMPTS):
            current, etag = self._read_document(key)
            updated = change(current)
            if updated is None:
                return
            if self._put(key, updated, if_absent=etag is None, if_match=etag, content_type="application/json"):
                return
        raise StoreError(f"{document} of {name!r} kept changing under {ALIAS_UPDATE_ATTEMPTS} attempts; retry")

    def read_shadow(self, name: str) -> bytes | None:
        return self._get(self._key(name, SHADOW_FILE))

    def write_shadow(self, name: str, data: bytes | None) -> None:
        key = self._key(name, SHADOW_FILE)
        if data is None:
            self._delete(key)
        else:
            self._put(key, data, if_absent=False, content_type="application/json")

    def put_version(self, manifest: Manifest, model_bytes: bytes) -> None:
        self._check_conditional_writes()
        name, version = manifest.name, str(manifest.version)
        claim = orjson.dumps({"publisher": uuid.uuid4().hex, "sha256": manifest.sha256, "at": datetime.now(UTC)})
        if not self._put(self._key(name, version, CLAIM_FILE), claim, if_absent=True, content_type="application/json"):
            raise VersionExists(
                f"model {name!r} version {version} already exists (or another publisher is writing it); "
                "versions are immutable"
            )
        # The claim is ours: nobody else writes under this version. The model first, the manifest last.
        model_key = self._key(name, version, MODEL_FILE)
        self._put(model_key, model_bytes, if_absent=False, content_type="application/octet-stream")
        body = manifest.model_dump_json(indent=2).encode()
        manifest_key = self._key(name, version, MANIFEST_FILE)
        # NOTE: a PUT retried after a lost response meets its own first attempt and gets 412: only a
        # manifest with different bytes means someone else wrote it.
        if not self._put(manifest_key, body, if_absent=True, content_type="application/json") and (
            self._get(manifest_key) != body
        ):
            raise VersionExists(f"model {name!r} version {version} already has a manifest; versions are immutable")

    def _check_conditional_writes(self) -> None:
        """Refuse to publish to a server that ignores ``If-None-Match: *``: two racing publishers would
        both think they won. Checked once per store, with a throwaway object."""
        with self._check_lock:
            if self._conditional_writes_checked:
                return
            key = self.location.key(f".inferq-probe-{uuid.uuid4().hex}")
            try:
                first = self._put(key, b"1", if_absent=True, content_type="text/plain")
                second = self._put(key, b"2", if_absent=True, content_type="text/plain")
            finally:
                self._delete(key)
            if not (first and not second):
                raise StoreError(
                    f"{self.location}: the S3 server ignores conditional writes (If-None-Match), so concurrent "
                    "publishers could overwrite each other; use a server that supports them (AWS S3, MinIO, SeaweedFS)"
                )
            self._conditional_writes_checked = True

    def _delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.location.bucket, Key=key)
        except Exception as exc:  # see _list
            raise translate(exc, f"delete s3://{self.location.bucket}/{key}") from None
