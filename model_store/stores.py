"""Opening a model store from its location string."""

from __future__ import annotations

from inferq.model_store.base import ModelStore
from inferq.model_store.local import LocalModelStore
from inferq.shared.extras import S3, needs_extra
from inferq.shared.s3.location import S3Location, is_s3


def open_model_store(location: str) -> ModelStore:
    """The model store at ``location``: ``s3://bucket/prefix`` or a directory path."""
    if is_s3(location):
        with needs_extra(S3, "an s3:// model store"):
            from inferq.model_store.s3 import S3ModelStore  # noqa: PLC0415  (boto3 clients are slow to build: on use)

        return S3ModelStore(S3Location.parse(location))
    return LocalModelStore(location)
