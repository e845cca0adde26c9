"""What an operator asks first: how deep are the queues, who consumes them, which models are there.

Queue numbers come from the RabbitMQ management API when it answers (ready, unacked and consumers,
and on a cluster each node's state and the node leading each queue), otherwise from AMQP itself: a
passive declare tells the ready count and the consumers, not the unacked. Every broker URL in
``INFERQ_AMQP_URL`` is also tried over AMQP, so a node this client cannot reach shows as such.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import pika
import pika.exceptions

from inferq.model_store.stores import open_model_store
from inferq.shared.broker.amqp import redacted_url
from inferq.shared.broker.connection import Endpoint, describe_failure, open_blocking
from inferq.shared.broker.topology import retry_queue
from inferq.shared.config.settings import OperatorSettings
from inferq.shared.errors import InferqError, ManagementUnavailable

Source = Literal["management", "amqp"]


@dataclass(frozen=True, slots=True)
class QueueStatus:
    """One queue's numbers; ``None`` where the source cannot tell."""

    role: str
    name: str
    exists: bool
    ready: int | None = None
    unacked: int | None = None
    consumers: int | None = None
    leader: str | None = None
    """The cluster node leading this (quorum) queue."""
    members: list[str] | None = None
    online: list[str] | None = None
    """Replicas whose node is up."""


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """One cluster node as the management API sees it."""

    name: str
    running: bool


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    """One broker URL of ``INFERQ_AMQP_URL``, as this client reaches it over AMQP."""

    url: str
    reachable: bool
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """A model's published versions and its aliases."""

    name: str
    versions: list[int]
    aliases: dict[str, int]


@dataclass(slots=True)
class Status:
    """The whole picture ``inferq status`` prints."""

    source: Source
    queues: list[QueueStatus]
    models: list[ModelStatus] = field(default_factory=list)
    nodes: list[NodeStatus] = field(default_factory=list)
    endpoints: list[EndpointStatus] = field(default_factory=list)
    management_error: str | None = None
    models_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return asdict(self)


def queue_roles(settings: OperatorSettings) -> list[tuple[str, str]]:
    """``(role, queue name)`` of every queue inferq owns."""
    return [
        ("jobs", settings.jobs_queue),
        ("retry", retry_queue(settings).name),
        ("results", settings.results_queue),
        ("dlq", settings.dlq_queue),
    ]


def collect_status(settings: OperatorSettings) -> Status:
    """Queues from the management API (or AMQP when it does not answer) and models from the store."""
    roles = queue_roles(settings)
    endpoints = [_reach(settings, url) for url in settings.amqp_urls]
    try:
        api = _Management(settings)
        status = Status("management", [_management_queue(api, role, name) for role, name in roles])
        status.nodes = _management_nodes(api)
    except ManagementUnavailable as exc:
        status = Status("amqp", _amqp_queues(settings, roles), management_error=str(exc))
    status.endpoints = endpoints
    try:
        status.models = _models(settings)
    except (InferqError, OSError) as exc:
        status.models_error = f"{type(exc).__name__}: {exc}"
    return status


# -- management API -------------------------------------------------------------------------------


def management_queues(settings: OperatorSettings, roles: list[tuple[str, str]]) -> list[QueueStatus]:
    """The numbers of the ``(role, name)`` queues from the management API; raises :class:`ManagementUnavailable`."""
    api = _Management(settings)
    return [_management_queue(api, role, name) for role, name in roles]


def management_base_urls(settings: OperatorSettings) -> list[str]:
    """``INFERQ_MANAGEMENT_URL``, or each AMQP node's host on the management port with its credentials."""
    if settings.management_url is not None:
        return [settings.management_url.get_secret_value().rstrip("/")]
    return [_management_url_for(url) for url in settings.amqp_urls]


def management_base_url(settings: OperatorSettings) -> str:
    """The first management API URL to try (see :func:`management_base_urls`)."""
    return management_base_urls(settings)[0]


def _management_url_for(amqp_url: str) -> str:
    amqp = urlsplit(amqp_url)
    tls = amqp.scheme == "amqps"
    userinfo = f"{amqp.username or 'guest'}:{amqp.password or 'guest'}@"
    netloc = f"{userinfo}{amqp.hostname or 'localhost'}:{15671 if tls else 15672}"
    return urlunsplit(("https" if tls else "http", netloc, "", "", ""))


def _vhost(settings: OperatorSettings) -> str:
    return str(pika.URLParameters(settings.amqp_urls[0]).virtual_host)


class _NotFound(Exception):
    pass


class _Management:
    """GETs against the management API of the first node that answers (any node answers for all)."""

    def __init__(self, settings: OperatorSettings) -> None:
        self._settings = settings
        self._bases = management_base_urls(settings)

    def get(self, path: str) -> Any:
        errors = []
        while self._bases:
            base = self._bases[0]
            try:
                return self._get(base, path)
            except ManagementUnavailable as exc:
                errors.append(str(exc))
                self._bases.pop(0)  # the next node's API, for this call and the ones after
        raise ManagementUnavailable("; ".join(errors) or "no management API")

    def _get(self, base: str, path: str) -> Any:
        parts = urlsplit(base)
        # Credentials go in a header, never in the URL urllib might echo back in an error.
        netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        url = urlunsplit((parts.scheme, netloc, parts.path, "", "")) + path
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        if parts.username is not None:
            token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=self._settings.management_timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise _NotFound(path) from None
            raise ManagementUnavailable(f"{redacted_url(base)} answered HTTP {exc.code}") from None
        except (OSError, ValueError) as exc:  # refused, timed out, not JSON
            raise ManagementUnavailable(f"{redacted_url(base)} unreachable: {exc}") from None


def _management_queue(api: _Management, role: str, name: str) -> QueueStatus:
    try:
        data = api.get(f"/api/queues/{quote(_vhost(api._settings), safe='')}/{quote(name, safe='')}")
    except _NotFound:
        return QueueStatus(role, name, exists=False)
    # A queue declared a moment ago has no sampled numbers yet: unknown, not zero.
    return QueueStatus(
        role,
        name,
        exists=True,
        ready=_count(data.get("messages_ready")),
        unacked=_count(data.get("messages_unacknowledged")),
        consumers=_count(data.get("consumers")),
        leader=data.get("leader") if isinstance(data.get("leader"), str) else None,
        members=_names(data.get("members")),
        online=_names(data.get("online")),
    )


def _management_nodes(api: _Management) -> list[NodeStatus]:
    try:
        data = api.get("/api/nodes?columns=name,running")
    except _NotFound:
        return []
    return [NodeStatus(str(n.get("name")), bool(n.get("running"))) for n in data if isinstance(n, dict)]


def _names(value: Any) -> list[str] | None:
    return [str(v) for v in value] if isinstance(value, list) else None


def _reach(settings: OperatorSettings, url: str) -> EndpointStatus:
    """Whether this client can open an AMQP connection to ``url`` now (one attempt, no retries)."""
    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.socket_timeout = settings.management_timeout_s
    params.blocked_connection_timeout = settings.management_timeout_s
    try:
        pika.BlockingConnection(params).close()
    except (pika.exceptions.AMQPError, OSError) as exc:
        return EndpointStatus(redacted_url(url), False, describe_failure(exc, Endpoint(params, redacted_url(url))))
    return EndpointStatus(redacted_url(url), True)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) else None


# -- AMQP fallback --------------------------------------------------------------------------------


def _amqp_queues(settings: OperatorSettings, roles: list[tuple[str, str]]) -> list[QueueStatus]:
    connection = open_blocking(settings, "inferq-status")
    try:
        return [_passive(connection, role, name) for role, name in roles]
    finally:
        connection.close()


def _passive(connection: pika.BlockingConnection, role: str, name: str) -> QueueStatus:
    # A passive declare of a missing queue closes the channel (404): one channel per queue.
    channel = connection.channel()
    try:
        frame = channel.queue_declare(name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return QueueStatus(role, name, exists=False)
        raise
    channel.close()
    return QueueStatus(role, name, exists=True, ready=frame.method.message_count, consumers=frame.method.consumer_count)


# -- models ---------------------------------------------------------------------------------------


def _models(settings: OperatorSettings) -> list[ModelStatus]:
    store = open_model_store(settings.model_store)
    return [ModelStatus(name, store.list_versions(name), store.read_aliases(name)) for name in store.list_models()]


def render_status(status: Status) -> list[str]:
    """The readable table."""
    lines = [f"{'QUEUE':<8} {'NAME':<40} {'READY':>9} {'UNACKED':>9} {'CONSUMERS':>9}"]
    for q in status.queues:
        if not q.exists:
            lines.append(f"{q.role:<8} {q.name:<40} {'(missing)':>9}")
            continue
        cells = [_cell(q.ready), _cell(q.unacked), _cell(q.consumers)]
        lines.append(f"{q.role:<8} {q.name:<40} {cells[0]:>9} {cells[1]:>9} {cells[2]:>9}")
    source = "management API" if status.source == "management" else "AMQP (management API unavailable: unacked unknown)"
    lines.append(f"queue numbers from {source}")
    lines.append("")
    lines += _render_cluster(status)
    if status.models_error is not None:
        lines.append(f"models: unavailable ({status.models_error})")
        return lines
    lines.append(f"{'MODEL':<24} {'VERSIONS':<24} ALIASES")
    for m in status.models:
        versions = ",".join(str(v) for v in m.versions[-8:]) + (" …" if len(m.versions) > 8 else "")
        aliases = ", ".join(f"{a}->{v}" for a, v in sorted(m.aliases.items())) or "-"
        lines.append(f"{m.name:<24} {versions:<24} {aliases}")
    if not status.models:
        lines.append("(no models published)")
    return lines


def _render_cluster(status: Status) -> list[str]:
    lines = [f"{'BROKER URL':<48} AMQP"]
    for e in status.endpoints:
        lines.append(f"{e.url:<48} {'reachable' if e.reachable else 'UNREACHABLE: ' + (e.error or '?')}")
    if status.nodes:
        lines.append(f"{'NODE':<48} STATE")
        lines += [f"{n.name:<48} {'running' if n.running else 'DOWN'}" for n in status.nodes]
    leaders = [q for q in status.queues if q.leader is not None]
    if leaders:
        lines.append(f"{'QUEUE':<8} {'LEADER':<40} REPLICAS ONLINE")
        for q in leaders:
            online = f"{len(q.online or [])}/{len(q.members or [])}"
            lines.append(f"{q.role:<8} {q.leader or '?':<40} {online}")
    lines.append("")
    return lines


def _cell(value: int | None) -> str:
    return "?" if value is None else str(value)
