"""inferq: asynchronous ONNX inference on RabbitMQ. The public API for producing jobs and reading results:
``from inferq import Producer, Job, Tensor, Result, job_from_rows, read_table, open_model_store, ...``.

Every ``inferq.*`` import runs this file first, the worker's included, so nothing is imported here until
it is used (PEP 562): ``import inferq`` loads neither pika nor pydantic.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inferq.model_store.base import read_table
    from inferq.model_store.stores import open_model_store
    from inferq.producer.client import Outgoing, Producer, new_job_id
    from inferq.producer.rows import job_from_columns, job_from_rows, jobs_from_rows
    from inferq.shared.config.settings import ProducerSettings, load_settings
    from inferq.shared.contract.messages import (
        Datatype,
        ErrorInfo,
        Job,
        OutputTensor,
        Result,
        Status,
        Tensor,
        VersionRef,
    )
    from inferq.shared.errors import ErrorCode, InferqError
    from inferq.shared.extras import MissingExtra
    from inferq.shared.results.base import ResultStore
    from inferq.shared.results.stores import open_result_store
    from inferq.shared.tables.table import RowError, Table

_HOMES = {
    "inferq.producer.client": ("Producer", "Outgoing", "new_job_id"),
    "inferq.producer.rows": ("job_from_rows", "job_from_columns", "jobs_from_rows"),
    "inferq.shared.contract.messages": (
        "Job",
        "Tensor",
        "Result",
        "OutputTensor",
        "ErrorInfo",
        "Status",
        "Datatype",
        "VersionRef",
    ),
    "inferq.shared.tables.table": ("RowError", "Table"),
    "inferq.shared.config.settings": ("ProducerSettings", "load_settings"),
    "inferq.model_store.base": ("read_table",),
    "inferq.model_store.stores": ("open_model_store",),
    "inferq.shared.results.base": ("ResultStore",),
    "inferq.shared.results.stores": ("open_result_store",),
    "inferq.shared.errors": ("ErrorCode", "InferqError"),
    "inferq.shared.extras": ("MissingExtra",),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "Datatype",
    "ErrorCode",
    "ErrorInfo",
    "InferqError",
    "Job",
    "MissingExtra",
    "Outgoing",
    "OutputTensor",
    "Producer",
    "ProducerSettings",
    "Result",
    "ResultStore",
    "RowError",
    "Status",
    "Table",
    "Tensor",
    "VersionRef",
    "job_from_columns",
    "job_from_rows",
    "jobs_from_rows",
    "load_settings",
    "new_job_id",
    "open_model_store",
    "open_result_store",
    "read_table",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its home module on first use (and keep it here for the next)."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'inferq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
