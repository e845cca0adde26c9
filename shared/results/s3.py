"""Results as ``s3://bucket/prefix/<job id>.json`` objects: conditional PUTs (the first result of an id
wins), a batch written by a bounded pool of threads. Labels and backfill row ids live beside them, under
``_labels/`` and ``_rows/`` (:class:`S3LabelStore`)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial
from typing import Any

import botocore.session
import orjson
from botocore.auth import S3SigV4Auth

from inferq.shared.contract.messages import Result, is_valid_job_id
from inferq.shared.errors import ResultNotFound, StoreError, StoreRefused, StoreUnreachable, ValueRefused
from inferq.shared.results.base import checked_id, replaceable
from inferq.shared.results.labels import (
    LABELS_PREFIX,
    ROWS_PREFIX,
    LabelStore,
    LabelValue,
    RowId,
    StoredResult,
    id_key,
)
from inferq.shared.s3.client import is_not_found, make_client, put_if, translate
from inferq.shared.s3.location import S3Location
from inferq.shared.s3.put import PutOutcome, SignedPutter, lean_putter

S3_WRITE_CONCURRENCY = 16
S3_SCAN_PAGE = 256
VISIBLE_WAIT_S = 10.0
"""How long a write that lost to another one waits for the winner's object to be readable."""
VISIBLE_POLL_S = 0.05


def _raise_worst(errors: Sequence[BaseException | None]) -> None:
    """Raise the error that decides what the caller does with a batch whose writes failed: the store
    refused (stop), else one worth retrying, else any other, else the refused contents (every id named)."""
    failed = [e for e in errors if e is not None]
    if not failed:
        return
    refused = [e for e in failed if isinstance(e, StoreRefused)]
    others = [e for e in failed if not isinstance(e, ValueRefused)]
    transient = [e for e in others if isinstance(e, OSError)]
    if refused or transient or others:
        raise (refused or transient or others)[0]
    values = [e for e in failed if isinstance(e, ValueRefused)]
    raise ValueRefused(str(values[0]), tuple(i for e in values for i in e.ids))


class S3ResultStore:
    """Results as objects under ``s3://bucket/prefix``; a batch is written by a bounded pool of threads.

    Writes go through :class:`SignedPutter` (PUTs signed by botocore on kept-alive connections) unless
    ``lean`` is off, a ``client`` is given (its credentials and CA settings are its own), or the lean path
    cannot write exactly as boto3 would (a proxy, a redirect: see ``shared/s3/put.py``); reads go through
    boto3."""

    def __init__(
        self,
        location: S3Location,
        client: Any | None = None,
        *,
        concurrency: int = S3_WRITE_CONCURRENCY,
        lean: bool = True,
    ) -> None:
        self.location = location
        self.concurrency = concurrency
        self._putter: SignedPutter | None = None
        if client is None:
            session = botocore.session.get_session()  # one session: the client's credentials are the putter's
            self._client = make_client(max_pool_connections=concurrency, session=session)
            self._putter = lean_putter(session, self._client, location.bucket) if lean else None
        else:
            self._client = client
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def describe(self) -> str:
        return str(self.location)

    def _key(self, job_id: str) -> str:
        return self.location.key(f"{checked_id(job_id)}.json")

    def put_many(self, results: Sequence[Result]) -> list[Result]:
        """Returns only once every result is stored, after all writes of the batch have finished (a retry
        finds its own earlier writes). If any write failed, raises :class:`StoreRefused` if S3 refuses the
        store, else ``StoreUnreachable`` (an ``OSError``) if one was worth retrying, else
        :class:`ValueRefused` naming every result whose object S3 refused."""
        # Credentials are frozen once per batch: a refreshed role's are used from the next batch on.
        putter = self._putter
        if putter is None or putter.redirected:
            put: Callable[[Result], PutOutcome] = self._put
        else:
            put = partial(self._put_lean, putter, putter.signer())
        if len(results) <= 1:
            return [self._put_first(put, result) for result in results]
        # NOTE: concurrent conditional PUTs of one key race each other: only the first result of an id in
        # the batch is written, and a later one gets whatever that write left stored.
        firsts: dict[str, Result] = {}
        for result in results:
            firsts.setdefault(result.id, result)
        pool = self._executor()
        futures = {job_id: pool.submit(self._put_first, put, first) for job_id, first in firsts.items()}
        wait(futures.values())
        _raise_worst([f.exception() for f in futures.values()])
        return [futures[result.id].result() for result in results]

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="inferq-s3-put")
            return self._pool

    def _put_first(self, put: Callable[[Result], PutOutcome], result: Result) -> Result:
        """Store ``result`` unless its id has a result; return what is stored under the id.

        NOTE: a conditional PUT that loses (412, or 409 while the other write is still in progress) does not
        mean the winner's object is readable yet: S3 answers 409 before the other write completes, and
        that write may still fail. The object is read until it shows, and the PUT tried again meanwhile
        (it stores ours if the other write failed), for up to ``VISIBLE_WAIT_S``."""
        deadline = time.monotonic() + VISIBLE_WAIT_S
        while True:
            try:
                outcome = put(result)
            except (StoreRefused, StoreUnreachable):
                raise
            except StoreError as exc:  # S3 refused this object's PUT (too large, or a code not known here)
                raise ValueRefused(str(exc), (result.id,)) from None
            if outcome is PutOutcome.STORED:
                return result
            try:
                stored, etag = self._read(result.id)
            except ResultNotFound:
                if time.monotonic() > deadline:
                    raise StoreUnreachable(
                        f"put {self.location}: {result.id!r} exists but stayed unreadable for {VISIBLE_WAIT_S:g}s"
                    ) from None
                time.sleep(VISIBLE_POLL_S)
                continue
            if not replaceable(stored, result):
                return stored  # the first result of an id wins
            if self._replace(result, etag):
                return result
            # Another writer replaced it first: read what it stored.

    def _put_lean(self, putter: SignedPutter, signer: S3SigV4Auth, result: Result) -> PutOutcome:
        if putter.redirected:  # an earlier write of this batch was redirected
            return self._put(result)
        outcome = putter.put(self._key(result.id), result.to_json(), signer)
        if outcome is PutOutcome.ELSEWHERE:
            return self._put(result)  # S3 redirected: boto3 follows it (and writes every later result)
        return outcome

    def _put(self, result: Result) -> PutOutcome:
        # the first result of an id wins
        stored = put_if(self._client, self.location.bucket, self._key(result.id), result.to_json(), if_none_match=True)
        return PutOutcome.STORED if stored else PutOutcome.EXISTS

    def _replace(self, result: Result, etag: str) -> bool:
        """Write ``result`` over the object whose ETag is ``etag``; false if it changed meanwhile (only the
        rejection read is replaced: a concurrent replacement wins)."""
        return put_if(self._client, self.location.bucket, self._key(result.id), result.to_json(), if_match=etag)

    def _read(self, job_id: str) -> tuple[Result, str]:
        """The stored result of ``job_id`` and its object's ETag; raises :class:`ResultNotFound`."""
        key = self._key(job_id)
        try:
            response = self._client.get_object(Bucket=self.location.bucket, Key=key)
            data = response["Body"].read()
        except Exception as exc:  # see _put
            if is_not_found(exc):
                raise ResultNotFound(f"no result for job {job_id!r} in {self.location}") from None
            raise translate(exc, f"get s3://{self.location.bucket}/{key}") from None
        return Result.model_validate_json(data), str(response["ETag"])

    def get(self, job_id: str) -> Result:
        return self._read(job_id)[0]

    def get_many(self, job_ids: Sequence[str]) -> dict[str, Result]:
        valid = [i for i in job_ids if is_valid_job_id(i)]
        if not valid:
            return {}
        futures = [self._executor().submit(self._get_or_none, job_id) for job_id in valid]
        found = (future.result() for future in futures)
        return {result.id: result for result in found if result is not None}

    def _get_or_none(self, job_id: str) -> Result | None:
        try:
            return self.get(job_id)
        except ResultNotFound:
            return None

    def _ids(self) -> Iterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.location.bucket, Prefix=self.location.prefix):
                for item in page.get("Contents", []):
                    name = item["Key"][len(self.location.prefix) :]
                    if name.endswith(".json") and "/" not in name:
                        yield name[: -len(".json")]
        except Exception as exc:  # see _put
            raise translate(exc, f"list {self.location}") from None

    def scan(self, model: str | None = None) -> Iterator[Result]:
        page: list[str] = []
        for job_id in self._ids():
            page.append(job_id)
            if len(page) == S3_SCAN_PAGE:
                yield from self._of_model(page, model)
                page = []
        yield from self._of_model(page, model)

    def _of_model(self, job_ids: list[str], model: str | None) -> Iterator[Result]:
        # Read concurrently, a page at a time; keep the listing's order.
        found = self.get_many(job_ids)
        for job_id in job_ids:
            result = found.get(job_id)
            if result is not None and (model is None or result.model == model):
                yield result

    def count(self, model: str | None = None) -> int:
        if model is None:
            return sum(1 for _ in self._ids())
        return sum(1 for _ in self.scan(model))

    def exists(self, job_id: str) -> bool:
        if not is_valid_job_id(job_id):
            return False
        key = self._key(job_id)
        try:
            self._client.head_object(Bucket=self.location.bucket, Key=key)
        except Exception as exc:  # see _put
            if is_not_found(exc):
                return False
            raise translate(exc, f"head s3://{self.location.bucket}/{key}") from None
        return True

    def labels(self) -> LabelStore:
        """Labels as ``_labels/<model>/`` objects, backfill row ids as ``_rows/<model>/`` objects, beside the
        results (:class:`S3LabelStore`)."""
        return S3LabelStore(self)

    def _stored(self, job_id: str) -> StoredResult | None:
        """The stored result of ``job_id`` with its object's time, or ``None``."""
        key = self._key(job_id)
        try:
            response = self._client.get_object(Bucket=self.location.bucket, Key=key)
            data = response["Body"].read()
        except Exception as exc:  # see _put
            if is_not_found(exc):
                return None
            raise translate(exc, f"get s3://{self.location.bucket}/{key}") from None
        return StoredResult(Result.model_validate_json(data), response["LastModified"].timestamp())

    def close(self) -> None:
        """Stop the write threads (idle ones; a running put_many finishes first)."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            if self._putter is not None:
                self._putter.close()


class S3LabelStore:
    """Labels and backfill row ids as objects beside an S3 result store's results.

    A label is ``<prefix>_labels/<model>/<digest of its id>``, written ``If-None-Match: *``: the first label
    of an id wins, as the first result of a job id does, across any number of writers. The row ids a
    backfill records in one call are one object, ``<prefix>_rows/<model>/<digest of its content>`` (the
    same call repeated writes the same object). Neither ends in ``.json``, so nothing that lists the results
    (``<prefix><job id>.json``) ever mistakes them for results. Unlike SQLite and PostgreSQL, a set of
    labels is not stored atomically: a submit cut short stores the rest when it is run again.
    """

    time_resolution_s = 1.0

    def __init__(self, results: S3ResultStore) -> None:
        self._results = results
        self._client = results._client
        self.location = results.location

    # -- writing ----------------------------------------------------------------------------------

    def put_labels(self, model: str, labels: Sequence[tuple[str, LabelValue]]) -> int:
        documents = {
            self.location.key(LABELS_PREFIX, model, id_key(label_id)): orjson.dumps({"id": label_id, "label": value})
            for label_id, value in labels
        }
        pool = self._results._executor()
        futures = [pool.submit(self._put_new, key, body) for key, body in documents.items()]
        wait(futures)
        _raise_worst([f.exception() for f in futures])
        return sum(f.result() for f in futures)

    def put_row_ids(self, model: str, rows: Sequence[RowId]) -> None:
        if not rows:
            return
        body = orjson.dumps([[r.row_id, r.job_id, r.index] for r in rows])
        self._put_new(self.location.key(ROWS_PREFIX, model, hashlib.sha256(body).hexdigest()[:40]), body)

    def _put_new(self, key: str, body: bytes) -> bool:
        """Write ``body`` as ``key`` unless it exists; True when this call wrote it.

        NOTE: as for results (``S3ResultStore._put_first``), losing a conditional PUT (409 while another
        write is under way) does not prove the other write will succeed: the object is looked for until it
        shows, and the PUT tried again meanwhile, for up to ``VISIBLE_WAIT_S``."""
        deadline = time.monotonic() + VISIBLE_WAIT_S
        while True:
            if put_if(self._client, self.location.bucket, key, body, if_none_match=True):  # the first label wins
                return True
            if self._exists(key):
                return False
            if time.monotonic() > deadline:
                raise StoreUnreachable(
                    f"put s3://{self.location.bucket}/{key}: exists but stayed unreadable for {VISIBLE_WAIT_S:g}s"
                )
            time.sleep(VISIBLE_POLL_S)

    def _exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.location.bucket, Key=key)
        except Exception as exc:  # see _put_new
            if is_not_found(exc):
                return False
            raise translate(exc, f"head s3://{self.location.bucket}/{key}") from None
        return True

    # -- reading ----------------------------------------------------------------------------------

    def labels(self, model: str) -> dict[str, LabelValue]:
        found: dict[str, LabelValue] = {}
        for body in self._bodies(self.location.key(LABELS_PREFIX, model, "")):
            document = orjson.loads(body)
            found[document["id"]] = document["label"]
        return found

    def labeled_models(self) -> list[str]:
        prefix = self.location.key(LABELS_PREFIX, "")
        models: list[str] = []
        try:
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.location.bucket, Prefix=prefix, Delimiter="/"):
                models.extend(p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", []))
        except Exception as exc:  # see _put_new
            raise translate(exc, f"list s3://{self.location.bucket}/{prefix}") from None
        return sorted(models)

    def row_ids(self, model: str, row_ids: Sequence[str]) -> dict[str, list[tuple[str, int]]]:
        wanted = set(row_ids)
        found: dict[str, set[tuple[str, int]]] = {}
        for body in self._bodies(self.location.key(ROWS_PREFIX, model, "")):
            for row_id, job_id, index in orjson.loads(body):
                if row_id in wanted:
                    found.setdefault(row_id, set()).add((job_id, index))
        return {row_id: sorted(pairs) for row_id, pairs in found.items()}

    def stored_results(self, job_ids: Sequence[str]) -> dict[str, StoredResult]:
        valid = sorted({i for i in job_ids if is_valid_job_id(i)})
        futures = [self._results._executor().submit(self._results._stored, job_id) for job_id in valid]
        found = (future.result() for future in futures)
        return {stored.result.id: stored for stored in found if stored is not None}

    def scan_results(self, model: str, since_s: float | None = None) -> Iterator[StoredResult]:
        # The listing carries each object's time: only those stored since ``since_s`` are read.
        page: list[str] = []
        for job_id, modified_s in self._listed_results():
            if since_s is None or modified_s >= since_s:
                page.append(job_id)
            if len(page) == S3_SCAN_PAGE:
                yield from self._of_model(page, model)
                page = []
        yield from self._of_model(page, model)

    def _of_model(self, job_ids: list[str], model: str) -> Iterator[StoredResult]:
        found = self.stored_results(job_ids)
        for job_id in job_ids:
            stored = found.get(job_id)
            if stored is not None and stored.result.model == model:
                yield stored

    def _listed_results(self) -> Iterator[tuple[str, float]]:
        """Each result's job id and object time, from the listing of the results prefix."""
        prefix = self.location.prefix
        try:
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.location.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    name = item["Key"][len(prefix) :]
                    if name.endswith(".json") and "/" not in name:
                        yield name[: -len(".json")], item["LastModified"].timestamp()
        except Exception as exc:  # see _put_new
            raise translate(exc, f"list {self.location}") from None

    def _bodies(self, prefix: str) -> list[bytes]:
        """The contents of every object under ``prefix``, read a page of the listing at a time, concurrently."""
        bodies: list[bytes] = []
        pool = self._results._executor()
        try:
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.location.bucket, Prefix=prefix):
                keys = [item["Key"] for item in page.get("Contents", [])]
                bodies.extend(pool.map(self._body, keys))
        except Exception as exc:  # see _put_new
            raise translate(exc, f"list s3://{self.location.bucket}/{prefix}") from None
        return bodies

    def _body(self, key: str) -> bytes:
        response = self._client.get_object(Bucket=self.location.bucket, Key=key)
        data: bytes = response["Body"].read()
        return data

    def close(self) -> None:
        """The client and threads are the result store's: it closes them."""
