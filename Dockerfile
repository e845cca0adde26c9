# syntax=docker/dockerfile:1
# The inferq image: `inferq` is the entry point and `inferq worker` the default command.
#   docker build -t inferq:0.1.0 .
#   docker run --rm -e INFERQ_AMQP_URL=amqp://user:pass@broker:5672/%2F inferq:0.1.0
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: a virtual environment with inferq and its dependencies, from pyproject.toml ---------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/inferq
WORKDIR /src
COPY pyproject.toml README.md __init__.py __main__.py py.typed ./
COPY shared ./shared
COPY model_store ./model_store
COPY producer ./producer
COPY admin ./admin
COPY monitoring ./monitoring
COPY gateway ./gateway
COPY worker ./worker
COPY cli ./cli
RUN /opt/inferq/bin/pip install --no-compile . \
    && /opt/inferq/bin/inferq --help >/dev/null

# -- runtime: the same base, the environment only, no compilers, no root ------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 inferq \
    && useradd --system --uid 10001 --gid inferq --home-dir /home/inferq --create-home --shell /usr/sbin/nologin inferq
COPY --from=build /opt/inferq /opt/inferq
# Runs with a read-only root file system: nothing is written but the stores, the model cache and /tmp.
ENV PATH=/opt/inferq/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    INFERQ_LOG_FORMAT=json \
    INFERQ_METRICS_PORT=9464
USER 10001:10001
WORKDIR /home/inferq
EXPOSE 9464
# /healthz answers while the process lives; /readyz (connected and consuming) is for load balancers
# and Kubernetes readiness, not for restarting a worker that waits for its broker.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('INFERQ_METRICS_PORT', '9464'), timeout=2)"]
ENTRYPOINT ["inferq"]
CMD ["worker"]
