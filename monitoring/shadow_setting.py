"""Shadow traffic settings: which version of a model also runs, on what share of its jobs.

Stored per model beside its aliases (``<model>/shadow.json``); running workers see a change within
``INFERQ_ALIAS_REFRESH_S``. A job is sampled when a hash of its id falls under the fraction, so a
redelivered job makes the same choice on any worker.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inferq.model_store.base import ModelStore, check_name, resolve_version
from inferq.shared.contract.messages import VersionRef
from inferq.shared.errors import StoreError

_SCALE = float(1 << 64)


class ShadowSetting(BaseModel):
    """Run ``target`` (a version number or an alias, resolved when a job runs) on ``fraction`` of the jobs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target: int | str
    fraction: Annotated[float, Field(gt=0, le=1)]


def sampled(job_id: str, fraction: float) -> bool:
    """True when ``job_id`` falls in the shadowed ``fraction`` (the same answer every time)."""
    digest = hashlib.blake2b(job_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE < fraction


def read_shadow(store: ModelStore, name: str) -> ShadowSetting | None:
    """The shadow setting of model ``name``, if one is on."""
    data = store.read_shadow(name)
    if data is None:
        return None
    try:
        return ShadowSetting.model_validate_json(data)
    except ValidationError:
        raise StoreError(f"corrupt shadow setting of model {name!r} in {store.describe()}") from None


def set_shadow(store: ModelStore, name: str, target: VersionRef, fraction: float) -> int:
    """Shadow ``fraction`` of model ``name``'s jobs to ``target``; returns the version it names now."""
    check_name(name)
    version = resolve_version(store, name, target)  # the model and the target must exist
    setting = ShadowSetting(target=target, fraction=fraction)
    store.write_shadow(name, orjson.dumps(setting.model_dump()))
    return version


def clear_shadow(store: ModelStore, name: str) -> None:
    """Turn shadow traffic of model ``name`` off."""
    check_name(name)
    resolve_version(store, name, "latest")
    store.write_shadow(name, None)
