"""Settings of an ``inferq serve`` process, read from ``INFERQ_*`` once in ``main()``."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr, field_validator

from inferq.shared.config.settings import ProducerSettings

MAX_PREFER_WAIT_S = 60.0


class GatewaySettings(ProducerSettings):
    """The HTTP gateway: a producer (it publishes jobs) that also reads models and results."""

    http_host: str = "0.0.0.0"  # probes and clients reach the container from outside
    http_port: Annotated[int, Field(ge=0, le=65535)] = 8080
    http_keep_alive_s: Annotated[int, Field(ge=1)] = 75
    """How long an idle client connection stays open. Above the idle timeout of the load balancers
    usually put in front (60 s on AWS ALB, nginx's 60 s): a server that closes first races the
    balancer's next request on that connection, and the request fails with a reset."""
    api_token: SecretStr | None = None
    """When set, every request but health, metrics and the schema needs ``Authorization: Bearer <token>``."""
    operations_store: str | None = None
    """Where accepted operations are recorded: ``sqlite:PATH`` or ``postgresql://…``. Unset: beside the
    result store (the same PostgreSQL database, or a SQLite file next to the results)."""
    # A request must not hang on a broker that is gone: the publisher gives up on a connection after
    # this long and answers 503, instead of the 60 s a batch producer waits.
    connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    # A refused publish (the jobs queue is full) is retried this long, then answered with 429: an HTTP
    # client has Retry-After for that, and holding its request would hold up every request of the round.
    publish_retry_s: Annotated[float, Field(gt=0)] = 0.1
    publish_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    """Longest a request waits for its job's confirm before it is answered 503."""
    http_wait_s: Annotated[float, Field(ge=0, le=MAX_PREFER_WAIT_S)] = 30.0
    """How long an inference request waits for its result before it is answered 202 with its operation
    (``Prefer: wait=N`` sets it per request; ``Prefer: respond-async`` answers 202 at once); 0 makes
    every request asynchronous."""
    max_prefer_wait_s: Annotated[float, Field(ge=0, le=MAX_PREFER_WAIT_S)] = MAX_PREFER_WAIT_S
    """The longest any request waits for its result, whatever its ``Prefer`` header asks."""
    alias_refresh_s: Annotated[float, Field(ge=0)] = 5.0
    # The same per-job bounds as the workers' (WorkerSettings): a job accepted here must not be
    # refused there for its size.
    max_rows_per_job: Annotated[int, Field(ge=1)] = 65536
    max_elements_per_tensor: Annotated[int, Field(ge=1)] = 4_000_000
    shutdown_grace_s: Annotated[float, Field(gt=0)] = 25.0
    """How long a stopping server lets in-flight requests finish after SIGTERM."""
    ready_cache_s: Annotated[float, Field(ge=0)] = 1.0

    @field_validator("api_token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if len(value.get_secret_value().strip()) < 16:
            raise ValueError("must be at least 16 characters (or unset to turn authentication off)")
        return value
