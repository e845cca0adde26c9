"""docker-compose.yml and the files it mounts, checked by parsing (no Docker engine runs here)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from inferq.model_store.manifest import Manifest
from inferq.monitoring.counting import Monitor
from inferq.monitoring.reference import Reference, describe_inputs, describe_outputs
from inferq.monitoring.store import FileMonitorStore
from inferq.shared.broker.topology import all_queues
from inferq.shared.config.settings import InferqSettings, WorkerSettings
from inferq.shared.contract.messages import Datatype, OutputTensor
from inferq.worker.live_performance import LivePerformance
from inferq.worker.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SECRET_NAME = re.compile(r"PASS|SECRET|TOKEN|AMQP_URL|MANAGEMENT_URL|ACCESS_KEY", re.I)
METRICS_PORT = WorkerSettings.model_fields["metrics_port"].default


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def mounted_files(service: dict[str, Any]) -> list[Path]:
    return [ROOT / v.split(":")[0] for v in service.get("volumes", []) if v.startswith("./")]


def test_the_stack_has_broker_s3_workers_producer_and_monitoring(services: dict[str, dict[str, Any]]) -> None:
    assert {
        "rabbitmq",
        "rabbitmq-definitions",
        "minio",
        "s3-bucket",
        "postgres",
        "worker",
        "producer",
        "prometheus",
        "grafana",
    } <= set(services)
    assert services["rabbitmq"]["image"].endswith("-management")
    assert services["producer"]["profiles"] == ["producer"]
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == ["monitoring"]
    assert "profiles" not in services["worker"]


def test_every_image_is_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service["image"]
        assert ":" in image, f"{name} has no tag"
        assert not image.endswith(":latest"), f"{name} floats on :latest"


def test_workers_can_be_scaled_and_wait_for_broker_definitions_and_bucket(
    services: dict[str, dict[str, Any]],
) -> None:
    worker = services["worker"]
    # --scale worker=4 needs neither a fixed container name nor a host port
    assert "container_name" not in worker
    assert "ports" not in worker
    assert worker["build"] == {"context": ".", "target": "worker"}
    assert worker["command"] == ["worker"]
    assert worker["depends_on"] == {
        "rabbitmq": {"condition": "service_healthy"},
        "rabbitmq-definitions": {"condition": "service_completed_successfully"},
        "s3-bucket": {"condition": "service_completed_successfully"},
        "postgres": {"condition": "service_healthy"},
    }
    assert services["producer"]["depends_on"] == worker["depends_on"]
    # stopped with more time than the worker's drain takes; runs with a read-only root file system
    assert int(worker["stop_grace_period"].rstrip("s")) > 25
    assert worker["read_only"] is True and "/tmp" in worker["tmpfs"]


def dockerfile_stages() -> set[str]:
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE))


def test_each_inferq_service_builds_the_image_with_only_the_extras_it_imports(
    services: dict[str, dict[str, Any]],
) -> None:
    # worker: the core and s3, postgres; api: + http; producer (seed.py fits a model): + sklearn
    targets = {name: s["build"]["target"] for name, s in services.items() if isinstance(s.get("build"), dict)}
    assert targets == {"worker": "worker", "api": "api", "producer": "producer"}
    assert set(targets.values()) <= dockerfile_stages()
    images = {services[name]["image"] for name in targets}
    assert len(images) == len(targets), "one image name per target, or compose builds one over another"
    assert all(services[name]["build"]["context"] == "." for name in targets)


def test_servers_have_healthchecks_and_one_shots_do_not_restart(services: dict[str, dict[str, Any]]) -> None:
    for name in ("rabbitmq", "minio", "prometheus"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    for name in ("rabbitmq-definitions", "s3-bucket", "producer"):
        assert services[name]["restart"] == "no", name
    assert services["rabbitmq-definitions"]["depends_on"] == {"rabbitmq": {"condition": "service_healthy"}}
    assert services["s3-bucket"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}


def test_workers_use_the_s3_server_and_the_broker_by_service_name(services: dict[str, dict[str, Any]]) -> None:
    env = services["worker"]["environment"]
    assert env["INFERQ_MODEL_STORE"].startswith("s3://")
    assert env["INFERQ_RESULT_STORE"].startswith("postgresql://") and "@postgres:5432/" in env["INFERQ_RESULT_STORE"]
    assert services["worker"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert services["postgres"]["image"].startswith("postgres:")
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert "@rabbitmq:5672/" in env["INFERQ_AMQP_URL"]
    assert env["INFERQ_METRICS_PORT"] == str(METRICS_PORT)
    bucket_cmd = services["s3-bucket"]["command"][0]
    assert "mc mb --ignore-existing" in bucket_cmd
    # queue names are left at their defaults, which the imported definitions declare
    assert not {"INFERQ_JOBS_QUEUE", "INFERQ_RESULTS_QUEUE", "INFERQ_MAX_DELIVERIES"} & set(env)


def test_no_credential_is_written_into_the_compose_file(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        env = service.get("environment", {})
        assert isinstance(env, dict), f"{name}: use a mapping for environment"
        for key, value in env.items():
            if SECRET_NAME.search(key):
                assert "${" in str(value), f"{name}.{key} must come from the environment"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"


def test_definitions_declare_the_queues_exactly_as_the_topology_does(services: dict[str, dict[str, Any]]) -> None:
    definitions_file = ROOT / "deploy" / "rabbitmq" / "definitions.json"
    assert definitions_file in mounted_files(services["rabbitmq-definitions"])
    assert "import /etc/inferq/definitions.json" in services["rabbitmq-definitions"]["command"][0]
    declared = {q["name"]: q for q in json.loads(definitions_file.read_text())["queues"]}
    expected = all_queues(InferqSettings.model_construct())
    names = {"inferq.jobs", "inferq.jobs.dlq", "inferq.jobs.retry", "inferq.results"}
    assert set(declared) == {spec.name for spec in expected} == names
    for spec in expected:
        assert declared[spec.name]["arguments"] == spec.arguments
        assert declared[spec.name]["durable"] is True
    for name in ("inferq.jobs", "inferq.jobs.retry"):
        arguments = declared[name]["arguments"]
        assert (arguments["x-queue-type"], arguments["x-overflow"], arguments["x-dead-letter-strategy"]) == (
            "quorum",
            "reject-publish",
            "at-least-once",
        )
        assert arguments["x-dead-letter-exchange"] == "inferq.jobs.dlq"
    # results and dead letters go to topic exchanges, each bound to its queue
    exchanges = json.loads(definitions_file.read_text())["exchanges"]
    assert [(e["name"], e["type"], e["durable"]) for e in exchanges] == [
        ("inferq.jobs.dlq", "topic", True),
        ("inferq.results", "topic", True),
    ]
    bindings = json.loads(definitions_file.read_text())["bindings"]
    assert sorted((b["source"], b["destination"], b["routing_key"]) for b in bindings) == [
        ("inferq.jobs.dlq", "inferq.jobs.dlq", "#"),
        ("inferq.results", "inferq.results", "#"),
    ]
    # and the file is exactly what the renderer writes, so it cannot drift from shared/broker/topology.py
    check = subprocess.run(
        [sys.executable, "scripts/render_definitions.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr


def test_prometheus_scrapes_every_worker_replica_on_the_metrics_port(services: dict[str, dict[str, Any]]) -> None:
    (config_file,) = [f for f in mounted_files(services["prometheus"]) if f.name == "prometheus.yml"]
    config = yaml.safe_load(config_file.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    dns = jobs["inferq-worker"]["dns_sd_configs"][0]
    assert (dns["names"], dns["type"], dns["port"]) == (["worker"], "A", METRICS_PORT)
    assert jobs["inferq-worker"]["metrics_path"] == "/metrics"
    assert jobs["rabbitmq"]["static_configs"][0]["targets"] == ["rabbitmq:15692"]


def _count_a_monitored_batch(metrics: WorkerMetrics, tmp: Path) -> None:
    """One batch of a version with a reference, so the drift counters have samples."""
    rows = np.arange(40, dtype=np.float32).reshape(20, 2)
    labels = np.array([0, 1] * 10)
    reference = Reference(
        rows=20, features=describe_inputs("X", rows, ["a", "b"]), outputs=describe_outputs({"label": labels})
    )
    manifest = Manifest.model_construct(name="m", version=1, reference=reference)
    monitor = Monitor(FileMonitorStore(tmp), 60, "w:1")
    monitor.register(metrics.registry)
    label = OutputTensor(name="label", shape=[20], datatype=Datatype.INT64, data=labels.tolist())
    monitor.observe(manifest, [{"X": rows}], [[label]])


def exported_names(tmp: Path) -> set[str]:
    """Every sample name a worker exports, with the _total/_bucket/_sum/_count suffixes."""
    metrics = WorkerMetrics()
    metrics.jobs.labels("m", "1", "succeeded", "").inc()
    for histogram in (metrics.batch_rows, metrics.inference_seconds):
        histogram.labels("m").observe(1)
    metrics.job_latency_seconds.observe_many("m", [1.0])
    metrics.model_load_seconds.labels("m").observe(1)
    metrics.model_cache_hits.labels("m").inc()
    metrics.model_cache_misses.labels("m").inc()
    _count_a_monitored_batch(metrics, tmp)
    # The live performance gauges (no labels here, so no samples: a gauge's family name is its sample name).
    metrics.registry.register(LivePerformance(str(tmp / "results"), str(tmp / "models")))
    families = list(text_string_to_metric_families(metrics.render().decode()))
    return {s.name for family in families for s in family.samples} | {f.name for f in families if f.type == "gauge"}


def test_grafana_dashboard_is_provisioned_and_queries_only_metrics_that_exist(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    grafana = services["grafana"]
    assert grafana["volumes"] == [
        "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro",
        "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro",
    ]
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/inferq.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    uid = datasource["datasources"][0]["uid"]

    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/inferq.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert all(panel["datasource"]["uid"] == uid for panel in dashboard["panels"])
    used = {name for expr in exprs for name in re.findall(r"\b((?:inferq|rabbitmq)_[a-z_]+)\b", expr)}
    inferq_used = {name for name in used if name.startswith("inferq_")}
    exported = exported_names(tmp_path)
    assert inferq_used <= exported, f"unknown metrics: {inferq_used - exported}"
    # every family the worker exports has a panel
    families = {"inferq_jobs_total", "inferq_batch_rows", "inferq_inference_seconds", "inferq_job_latency_seconds"}
    families |= {"inferq_jobs_in_flight", "inferq_model_load_seconds", "inferq_model_cache_hits_total"}
    families |= {"inferq_worker_draining", "inferq_feature_bin_total", "inferq_output_bin_total"}
    families |= {"inferq_monitored_rows_total", "inferq_feature_reference_ratio", "inferq_output_reference_ratio"}
    assert all(any(name.startswith(f) for name in inferq_used) for f in families)
    grid = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in dashboard["panels"]]
    assert len(grid) == len(set(grid)), "panels overlap"


def test_the_api_serves_on_localhost_waits_for_the_stack_and_stops_gracefully(
    services: dict[str, dict[str, Any]],
) -> None:
    from inferq.gateway.settings import GatewaySettings  # noqa: PLC0415

    api = services["api"]
    assert api["command"] == ["serve"] and api["build"]["target"] == "api"
    assert api["ports"] == [f"127.0.0.1:{api['environment']['INFERQ_HTTP_PORT']}:8080"]
    assert int(api["environment"]["INFERQ_HTTP_PORT"]) == GatewaySettings.model_fields["http_port"].default
    assert api["depends_on"] == services["worker"]["depends_on"]
    # The api image's own HEALTHCHECK probes /v2/health/live on INFERQ_HTTP_PORT (tests/deploy/test_container_image.py)
    assert "healthcheck" not in api
    # Results in PostgreSQL: the operation records go to the same database, so replicas share them.
    assert api["environment"]["INFERQ_RESULT_STORE"].startswith("postgresql://")
    assert "INFERQ_OPERATIONS_STORE" not in api["environment"]
    assert int(api["stop_grace_period"].rstrip("s")) > GatewaySettings.model_fields["shutdown_grace_s"].default
    assert api["read_only"] is True
