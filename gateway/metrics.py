"""The gateway's Prometheus metrics, on a registry of their own (several apps in one test process never
share counters). Labels are route templates and status codes, never caller-chosen text."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
UNMATCHED_ROUTE = "_unmatched"


class GatewayMetrics:
    """Every metric ``inferq serve`` exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "inferq_http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "inferq_http_request_seconds",
            "Time to answer an HTTP request, by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.jobs_accepted = Counter(
            "inferq_http_jobs_accepted", "Jobs published and confirmed by the broker for an HTTP request.", registry=r
        )
        self.jobs_refused = Counter(
            "inferq_http_jobs_refused",
            "Jobs not accepted, by reason (queue_full, broker_unavailable, id_conflict, invalid).",
            ["reason"],
            registry=r,
        )
        self.waiting = Gauge(
            "inferq_http_waiting_requests", "Requests waiting for a result (Prefer: wait).", registry=r
        )
        self.waits_answered = Counter(
            "inferq_http_waits_answered",
            "Waiting requests answered with their result, by what brought it: notification or store (the fallback).",
            ["by"],
            registry=r,
        )
        self.broker_connected = Gauge(
            "inferq_http_broker_connected", "1 while the gateway's publisher is connected to the broker.", registry=r
        )

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
