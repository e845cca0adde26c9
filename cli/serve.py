"""``inferq serve``: the HTTP API (the http extra: FastAPI and uvicorn)."""

from __future__ import annotations

import click

from inferq.cli.common import Command
from inferq.shared.config.logging import configure_logging
from inferq.shared.config.settings import load_settings


@click.command(cls=Command)
def serve() -> None:
    """Serve the HTTP API (Open Inference Protocol requests in, operations out) until SIGTERM/SIGINT."""
    from inferq.gateway.server import serve as run_gateway  # noqa: PLC0415  (FastAPI and uvicorn: load on use)
    from inferq.gateway.settings import GatewaySettings  # noqa: PLC0415

    settings = load_settings(GatewaySettings)
    token = settings.api_token.get_secret_value() if settings.api_token is not None else None
    configure_logging(settings.log_level, settings.log_format, [settings.amqp_url.get_secret_value(), token])
    run_gateway(settings)
