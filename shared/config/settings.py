"""Process settings: one pydantic-settings class per process, read from ``INFERQ_*`` once in ``main()``."""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Mapping
from typing import Annotated, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from inferq.shared.errors import ConfigError

S = TypeVar("S", bound="InferqSettings")

ENV_PREFIX = "INFERQ_"
NOT_SETTINGS = ("INFERQ_TEST_",)
"""Prefixes of ``INFERQ_*`` variables that are not settings of any process (the test suite's)."""

QueueName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:-]+$")]


def split_urls(value: str) -> list[str]:
    """``a,b, c`` -> ``[a, b, c]``; empty items are dropped."""
    return [url.strip() for url in value.split(",") if url.strip()]


class InferqSettings(BaseSettings):
    """What every inferq process needs: the broker, the queues and the stores."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/%2F")
    amqp_shuffle: bool = True
    """Try the broker URLs in an order shuffled per process (spreads a fleet over a cluster's nodes);
    false keeps the given order, e.g. to prefer a nearby node and fall back to the others."""
    jobs_queue: QueueName = "inferq.jobs"
    results_queue: QueueName = "inferq.results"
    results_exchange: QueueName | None = None
    """The topic exchange results are published to (routing key ``<model>.<status>``); unset: named
    like the results queue, so two deployments on one broker stay apart."""
    results_max_length: Annotated[int, Field(ge=1)] = 1_000_000
    results_max_age_s: Annotated[int, Field(ge=1)] = 7 * 24 * 3600
    model_store: str = "./var/models"
    result_store: str = "sqlite:var/results.db"
    """Where results are kept: ``sqlite:PATH``, ``postgresql://…``, ``s3://bucket/prefix`` or a directory."""
    connect_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    heartbeat_s: Annotated[int, Field(ge=0, le=600)] = 30
    max_deliveries: Annotated[int, Field(ge=1, le=1000)] = 5
    max_queue_length: Annotated[int, Field(ge=1)] = 1_000_000
    max_message_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024
    log_format: Annotated[str, Field(pattern=r"^(auto|json|console)$")] = "auto"
    log_level: Annotated[str, Field(pattern=r"^(?i:debug|info|warning|error)$")] = "info"

    @field_validator("amqp_url")
    @classmethod
    def _amqp_scheme(cls, value: SecretStr) -> SecretStr:
        urls = split_urls(value.get_secret_value())
        if not urls:
            raise ValueError("must name at least one amqp:// or amqps:// URL")
        for url in urls:
            if not url.startswith(("amqp://", "amqps://")):
                raise ValueError("each comma-separated URL must start with amqp:// or amqps://")
        return value

    @property
    def amqp_urls(self) -> list[str]:
        """The broker's URLs: one node, or a cluster's nodes (``INFERQ_AMQP_URL`` separated by commas)."""
        return split_urls(self.amqp_url.get_secret_value())

    @property
    def results_exchange_name(self) -> str:
        """The results topic exchange: ``INFERQ_RESULTS_EXCHANGE``, or the results queue's name."""
        return self.results_exchange or self.results_queue

    @property
    def dlq_queue(self) -> str:
        """Where messages that cannot become a result go: ``<jobs queue>.dlq``."""
        return f"{self.jobs_queue}.dlq"


class WorkerSettings(InferqSettings):
    """Settings of an ``inferq worker`` process."""

    max_batch_rows: Annotated[int, Field(ge=1, le=65536)] = 256
    max_wait_ms: Annotated[float, Field(ge=0, le=60_000)] = 0.0
    # Deliveries stay unacked until their results are stored and confirmed: the window must cover a whole
    # batch being processed plus one waiting on confirms, or the worker idles between batches.
    prefetch: Annotated[int, Field(ge=1, le=65535)] = 2048
    max_loaded_models: Annotated[int, Field(ge=1, le=1000)] = 8
    alias_refresh_s: Annotated[float, Field(ge=0)] = 5.0
    max_rows_per_job: Annotated[int, Field(ge=1)] = 65536
    max_elements_per_tensor: Annotated[int, Field(ge=1)] = 4_000_000
    intra_op_threads: Annotated[int, Field(ge=1, le=256)] = 1
    store_retry_max_s: Annotated[float, Field(gt=0)] = 30.0
    model_cache: str | None = None
    max_model_bytes: Annotated[int, Field(ge=1)] = 1 << 30
    drain_poll_ms: Annotated[float, Field(gt=0)] = 100.0
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9464
    """Port of ``/metrics``, ``/healthz`` and ``/readyz``; 0 turns the HTTP server off."""
    metrics_host: str = "0.0.0.0"  # probes and Prometheus reach the container from outside
    job_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    broker_consumer_timeout_s: Annotated[float, Field(gt=0)] = 1800.0
    shutdown_grace_s: Annotated[float, Field(gt=0)] = 25.0
    monitor: bool = True
    """Count inputs and outputs of versions published with a reference (drift); false turns it off."""
    monitor_window_s: Annotated[int, Field(ge=1, le=86_400)] = 60
    """Length of the tumbling windows drift counts are written in."""
    shadow_max_backlog: Annotated[int, Field(ge=0)] = 10_000
    """Shadow traffic is skipped (and counted) while more jobs than this wait in the jobs queue."""
    ort_providers: str = "CPUExecutionProvider"
    """onnxruntime execution providers in order of preference, comma-separated, e.g.
    ``CUDAExecutionProvider,CPUExecutionProvider`` where onnxruntime-gpu is installed."""

    @property
    def providers(self) -> tuple[str, ...]:
        """:attr:`ort_providers` as a tuple."""
        return tuple(p.strip() for p in self.ort_providers.split(",") if p.strip())

    @model_validator(mode="after")
    def _job_fits_in_consumer_timeout(self) -> WorkerSettings:
        # RabbitMQ closes the channel of a consumer that holds a delivery longer than its
        # consumer_timeout: a job allowed to run longer would be redelivered while still running.
        if self.job_timeout_s >= self.broker_consumer_timeout_s:
            raise ValueError(
                f"job_timeout_s ({self.job_timeout_s:g}) must be below broker_consumer_timeout_s "
                f"({self.broker_consumer_timeout_s:g}), RabbitMQ's consumer_timeout"
            )
        return self


class ProducerSettings(InferqSettings):
    """Settings of a producing process (``inferq submit``, ``inferq backfill``, the library client)."""

    confirm_window: Annotated[int, Field(ge=1, le=65535)] = 1000
    publish_retry_s: Annotated[float, Field(gt=0)] = 60.0


class OperatorSettings(InferqSettings):
    """Settings of the operator commands (``inferq status``, ``inferq dlq``)."""

    management_url: SecretStr | None = None
    """RabbitMQ management API, e.g. ``http://user:pass@rabbitmq:15672``; unset: the AMQP host on port
    15672 with the AMQP credentials. When it cannot be reached, ``status`` falls back to AMQP."""
    management_timeout_s: Annotated[float, Field(gt=0)] = 3.0
    shutdown_grace_s: Annotated[float, Field(gt=0)] = 25.0
    """The workers' shutdown grace: without the management API, ``backfill --out`` counts a job as vanished
    only once the queues showed nothing ready and no consumer for longer than this."""


def known_variables() -> set[str]:
    """Every ``INFERQ_*`` variable some inferq process reads: the fields of every settings class."""
    classes: list[type[InferqSettings]] = [InferqSettings]
    names: set[str] = set()
    while classes:
        cls = classes.pop()
        names.update(ENV_PREFIX + field.upper() for field in cls.model_fields)
        classes.extend(cls.__subclasses__())
    return names


def misspelled_variables(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """``(variable, nearest setting)`` for each ``INFERQ_*`` variable in ``environ`` that no process reads
    but that looks like one that does: set, and silently ignored, it is almost certainly a typo."""
    known = known_variables()
    # Compared without the prefix, which every candidate shares and would make anything look alike.
    suffixes = {name.removeprefix(ENV_PREFIX): name for name in known}
    found = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known or upper.startswith(NOT_SETTINGS):
            continue
        nearest = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), suffixes, n=1, cutoff=0.7)
        if nearest:
            found.append((name, suffixes[nearest[0]]))
    return found


def load_settings(cls: type[S]) -> S:
    """Read settings from the environment; bad configuration becomes one clear :class:`ConfigError`.

    A variable that looks like a misspelled setting is named on stderr, with the setting it resembles
    (before logging is set up, and never on stdout, which carries the commands' output)."""
    for name, nearest in misspelled_variables(os.environ):
        print(f"inferq: warning: {name} is not a setting (ignored); did you mean {nearest}?", file=sys.stderr)
    try:
        return cls()
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False, include_input=False):
            if error["loc"]:
                problems.append("INFERQ_" + "_".join(str(p) for p in error["loc"]).upper() + f": {error['msg']}")
            else:  # a check across several settings names them in its message
                problems.append(error["msg"].removeprefix("Value error, "))
        raise ConfigError("bad configuration: " + "; ".join(problems)) from None
