"""Process settings: one pydantic-settings class per process, read from ``INFERQ_*`` once in ``main()``."""

from __future__ import annotations

from typing import Annotated, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ConfigError

S = TypeVar("S", bound="InferqSettings")

QueueName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:-]+$")]


class InferqSettings(BaseSettings):
    """What every inferq process needs: the broker, the queues and the stores."""

    model_config = SettingsConfigDict(env_prefix="INFERQ_", frozen=True, extra="ignore")

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/%2F")
    jobs_queue: QueueName = "inferq.jobs"
    results_queue: QueueName = "inferq.results"
    model_store: str = "./var/models"
    result_store: str = "./var/results"
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
        if not value.get_secret_value().startswith(("amqp://", "amqps://")):
            raise ValueError("must start with amqp:// or amqps://")
        return value

    @property
    def dlq_queue(self) -> str:
        """Where messages that cannot become a result go: ``<jobs queue>.dlq``."""
        return f"{self.jobs_queue}.dlq"


class WorkerSettings(InferqSettings):
    """Settings of an ``inferq worker`` process."""

    max_batch_rows: Annotated[int, Field(ge=1, le=65536)] = 256
    max_wait_ms: Annotated[float, Field(ge=0, le=60_000)] = 2.0
    # Deliveries stay unacked until their results are stored and confirmed: the window must cover a whole
    # batch being processed plus one waiting on confirms, or the worker idles between batches.
    prefetch: Annotated[int, Field(ge=1, le=65535)] = 2048
    max_loaded_models: Annotated[int, Field(ge=1, le=1000)] = 8
    alias_refresh_s: Annotated[float, Field(ge=0)] = 5.0
    max_rows_per_job: Annotated[int, Field(ge=1)] = 65536
    max_elements_per_tensor: Annotated[int, Field(ge=1)] = 4_000_000
    intra_op_threads: Annotated[int, Field(ge=1, le=256)] = 1
    store_retry_max_s: Annotated[float, Field(gt=0)] = 30.0
    drain_poll_ms: Annotated[float, Field(gt=0)] = 100.0


class ProducerSettings(InferqSettings):
    """Settings of a producing process (``inferq submit``, ``inferq backfill``, the library client)."""

    confirm_window: Annotated[int, Field(ge=1, le=65535)] = 1000
    publish_retry_s: Annotated[float, Field(gt=0)] = 60.0


def load_settings(cls: type[S]) -> S:
    """Read settings from the environment; bad configuration becomes one clear :class:`ConfigError`."""
    try:
        return cls()
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False, include_input=False):
            name = "INFERQ_" + "_".join(str(p) for p in error["loc"]).upper()
            problems.append(f"{name}: {error['msg']}")
        raise ConfigError("bad configuration: " + "; ".join(problems)) from None
