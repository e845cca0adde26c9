# syntax=docker/dockerfile:1
# The inferq images, each with only the extras its process imports, at the versions constraints.txt pins:
#   docker build -t inferq:0.1.0 .                                      the worker (the last stage, the default)
#   docker build --target api -t inferq-api:0.1.0 .                     inferq serve: the worker's + http
#   docker build --target producer -t inferq-producer:0.1.0 .           the worker's + sklearn and tables: publish .joblib, backfill
#   docker run --rm -e INFERQ_AMQP_URL=amqp://user:pass@broker:5672/%2F inferq:0.1.0
# `inferq` is every image's entry point; the command is what the stage names.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: the worker's virtual environment, the core and the s3 and postgres extras ----------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
# No pip in the environment the images ship: the base image's pip installs into it (--python).
RUN python -m venv --without-pip /opt/inferq
WORKDIR /src
COPY constraints.txt pyproject.toml README.md __init__.py __main__.py py.typed ./
COPY shared ./shared
COPY model_store ./model_store
COPY producer ./producer
COPY admin ./admin
COPY monitoring ./monitoring
COPY gateway ./gateway
COPY worker ./worker
COPY cli ./cli
# Bytecode is compiled here, once: unchecked-hash .pyc files are used without looking at the sources, so
# a container on a read-only root file system never compiles a module at start.
RUN pip --python /opt/inferq/bin/python install --no-compile -c constraints.txt '.[s3,postgres]' \
    && /opt/inferq/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/inferq \
    && /opt/inferq/bin/python -c "import inferq.worker.worker, boto3, psycopg_pool" \
    && /opt/inferq/bin/inferq --help >/dev/null

# -- build-api: the same plus the http extra (FastAPI, uvicorn) --------------------------------------
FROM build AS build-api
RUN pip --python /opt/inferq/bin/python install --no-compile -c constraints.txt '.[s3,postgres,http]' \
    && /opt/inferq/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/inferq \
    && /opt/inferq/bin/python -c "import inferq.gateway.server, fastapi, uvicorn"

# -- build-producer: the same plus the sklearn (scikit-learn, skl2onnx) and tables (pyarrow, pandas) extras
# (the worker's image carries neither: workers decode JSON tensors with numpy alone)
FROM build AS build-producer
RUN pip --python /opt/inferq/bin/python install --no-compile -c constraints.txt '.[s3,postgres,sklearn,tables]' \
    && /opt/inferq/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/inferq \
    && /opt/inferq/bin/python -c "import inferq.model_store.convert, inferq.shared.tables.columnar, sklearn, skl2onnx"

# -- runtime: what every image shares; no compilers, no root, no pip in /opt/inferq ------------------
FROM ${PYTHON_IMAGE} AS runtime
# The standard library's bytecode too, where the base image left it out (its timestamps never change).
RUN python -m compileall -q -j 0 -x '/(test|tests|idle_test)/' "$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')" \
    && groupadd --system --gid 10001 inferq \
    && useradd --system --uid 10001 --gid inferq --home-dir /home/inferq --create-home --shell /usr/sbin/nologin inferq
# Runs with a read-only root file system: nothing is written but the stores, the model cache and /tmp.
ENV PATH=/opt/inferq/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    INFERQ_LOG_FORMAT=json
USER 10001:10001
WORKDIR /home/inferq
ENTRYPOINT ["inferq"]

# -- producer: publish scikit-learn models (.joblib), submit, backfill (CSV, Parquet, JSONL); one-shot commands --------------
FROM runtime AS producer
COPY --from=build-producer /opt/inferq /opt/inferq
CMD ["--help"]

# -- api: inferq serve, the HTTP API on INFERQ_HTTP_PORT ----------------------------------------------
FROM runtime AS api
COPY --from=build-api /opt/inferq /opt/inferq
ENV INFERQ_HTTP_PORT=8080
EXPOSE 8080
# /v2/health/live answers while the server runs; /v2/health/ready (broker connected, jobs queue below its
# bound) is for load balancers and Kubernetes readiness, not for restarting a server.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/live' % os.environ.get('INFERQ_HTTP_PORT', '8080'), timeout=2)"]
CMD ["serve"]

# -- worker: the default target ------------------------------------------------------------------------
FROM runtime AS worker
COPY --from=build /opt/inferq /opt/inferq
ENV INFERQ_METRICS_PORT=9464
EXPOSE 9464
# /healthz answers while the process lives; /readyz (connected and consuming) is for load balancers
# and Kubernetes readiness, not for restarting a worker that waits for its broker.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('INFERQ_METRICS_PORT', '9464'), timeout=2)"]
CMD ["worker"]
