"""Opening a model store from its location string."""

from __future__ import annotations

from model_store.base import ModelStore
from model_store.local import LocalModelStore
from shared.errors import StoreError


def open_model_store(location: str) -> ModelStore:
    """The model store at ``location``: a directory path."""
    if location.startswith("s3://"):
        raise StoreError("s3:// model stores are not available in this build")
    return LocalModelStore(location)
