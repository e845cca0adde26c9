"""deploy/k8s: every manifest parses, the kustomization renders, and the invariants that keep workers
safe to scale hold (checked on what `kubectl kustomize` renders, i.e. what would be applied)."""

from __future__ import annotations

import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from inferq.gateway.settings import GatewaySettings
from inferq.shared.broker.topology import QUORUM_GROUP_SIZE, jobs_queue, retry_queue
from inferq.shared.config.settings import WorkerSettings, split_urls
from inferq.worker.metrics import MetricsServer, WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SECRET_NAME = re.compile(r"PASS|SECRET|TOKEN|AMQP_URL|MANAGEMENT_URL|ACCESS_KEY", re.I)
CREDENTIALS_IN_URL = re.compile(r"://[^/\s:@]*:[^/\s@]+@")
SECRET_REFERENCE = re.compile(r"\$\((RABBITMQ_USERNAME|RABBITMQ_PASSWORD)\)")
"""Kubernetes substitutes these from the operator's Secret when it starts the container."""
BROKER_USER_SECRET = "inferq-rabbitmq-default-user"


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, Any]]:
    """``kind/name`` → object, from ``kubectl kustomize deploy/k8s``."""
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True).stdout
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(out) if d}


@pytest.fixture(scope="module")
def pod(rendered: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = rendered["Deployment/inferq-worker"]["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def config(rendered: dict[str, dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = rendered["ConfigMap/inferq-config"]["data"]
    return data


def test_every_manifest_parses_and_the_kustomization_lists_them_all() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    for name in files:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], name


def test_the_rendered_set_is_a_worker_deployment_with_config_scaling_budget_and_metrics(
    rendered: dict[str, dict[str, Any]],
) -> None:
    assert set(rendered) == {
        "ConfigMap/inferq-config",
        "RabbitmqCluster/inferq-rabbitmq",
        "Deployment/inferq-worker",
        "Service/inferq-worker-metrics",
        "PodDisruptionBudget/inferq-worker",
        "TriggerAuthentication/inferq-rabbitmq",
        "ScaledObject/inferq-worker",
        "Deployment/inferq-api",
        "Service/inferq-api",
        "PrometheusRule/inferq",
        "PodMonitor/inferq-worker",
        "PodMonitor/inferq-api",
        "PodMonitor/inferq-rabbitmq",
    }
    assert all(obj["metadata"]["namespace"] == "inferq" for obj in rendered.values())
    assert "Secret" not in {obj["kind"] for obj in rendered.values()}  # created out of band, never committed


def test_termination_grace_outlasts_the_worker_shutdown_grace(pod: dict[str, Any], config: dict[str, str]) -> None:
    shutdown_grace_s = float(config["INFERQ_SHUTDOWN_GRACE_S"])
    field = WorkerSettings.model_fields.get("shutdown_grace_s")
    if field is not None:  # the setting's own default, where the worker defines one
        assert float(field.default) <= shutdown_grace_s
    assert pod["terminationGracePeriodSeconds"] > shutdown_grace_s + 5


def test_worker_runs_non_root_on_a_read_only_root_with_writable_scratch(pod: dict[str, Any]) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert all("emptyDir" in volumes[name] for name in mounts.values())


def test_worker_has_requests_and_limits(pod: dict[str, Any]) -> None:
    resources = pod["containers"][0]["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind


def _serve_probe(path: str, ready: bool) -> int:
    """What the worker's real HTTP handler answers on ``path``."""

    class State:
        stopping = False
        in_flight = 0

        @property
        def ready(self) -> bool:
            return ready

    server = MetricsServer(WorkerMetrics(), State(), "127.0.0.1", 0).start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code
    finally:
        server.close()


def test_probes_hit_the_worker_endpoints_on_its_metrics_port(pod: dict[str, Any], config: dict[str, str]) -> None:
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == int(config["INFERQ_METRICS_PORT"]) == WorkerSettings.model_fields["metrics_port"].default
    readiness, liveness = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert (readiness["path"], readiness["port"]) == ("/readyz", "metrics")
    assert (liveness["path"], liveness["port"]) == ("/healthz", "metrics")
    # and the worker really serves them: readiness follows the worker's state, liveness does not
    assert _serve_probe(readiness["path"], ready=True) == 200
    assert _serve_probe(readiness["path"], ready=False) == 503
    assert _serve_probe(liveness["path"], ready=False) == 200


def test_config_comes_from_the_configmap_and_secrets_only_by_reference(
    rendered: dict[str, dict[str, Any]], pod: dict[str, Any], config: dict[str, str]
) -> None:
    (container,) = pod["containers"]
    assert container["envFrom"] == [{"configMapRef": {"name": "inferq-config"}}]
    env = {e["name"]: e for e in container["env"]}
    assert {"INFERQ_AMQP_URL", "INFERQ_RESULT_STORE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
    from_secrets = {"inferq-secrets", BROKER_USER_SECRET}
    for name, entry in env.items():
        if name == "INFERQ_AMQP_URL":  # composed of the broker's node addresses and secret references
            assert not CREDENTIALS_IN_URL.search(SECRET_REFERENCE.sub("", entry["value"]))
            continue
        assert "value" not in entry, f"{name} is inline"
        assert entry["valueFrom"]["secretKeyRef"]["name"] in from_secrets
    for key, value in config.items():
        assert not SECRET_NAME.search(key), f"{key} belongs in the Secret"
        assert not CREDENTIALS_IN_URL.search(value), f"{key} carries credentials"
    for obj in rendered.values():
        text = SECRET_REFERENCE.sub("", yaml.safe_dump(obj, width=10_000))
        assert not CREDENTIALS_IN_URL.search(text), obj["metadata"]["name"]


def test_keda_scales_the_deployment_on_the_jobs_and_retry_queues_down_to_zero(
    rendered: dict[str, dict[str, Any]], config: dict[str, str]
) -> None:
    scaled = rendered["ScaledObject/inferq-worker"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "inferq-worker"
    assert scaled["minReplicaCount"] == 0
    assert scaled["maxReplicaCount"] >= 1
    assert scaled["cooldownPeriod"] >= 60
    jobs_trigger, retry_trigger = scaled["triggers"]
    settings = WorkerSettings.model_construct()
    assert jobs_trigger["metadata"]["queueName"] == config["INFERQ_JOBS_QUEUE"] == jobs_queue(settings).name
    # A backlog of suspects in <jobs>.retry scales the fleet too (and wakes it from zero).
    assert retry_trigger["metadata"]["queueName"] == retry_queue(settings).name
    for trigger in (jobs_trigger, retry_trigger):
        assert trigger["type"] == "rabbitmq"
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert int(trigger["metadata"]["value"]) > 0
        assert trigger["metadata"]["activationValue"] == "0"
        auth = rendered[f"TriggerAuthentication/{trigger['authenticationRef']['name']}"]["spec"]
        assert auth["secretTargetRef"] == [
            {"parameter": "host", "name": "inferq-secrets", "key": "INFERQ_MANAGEMENT_URL"}
        ]


def test_disruption_budget_and_metrics_service_select_the_worker_pods(rendered: dict[str, dict[str, Any]]) -> None:
    labels = rendered["Deployment/inferq-worker"]["spec"]["template"]["metadata"]["labels"]
    selector = rendered["Deployment/inferq-worker"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    pdb = rendered["PodDisruptionBudget/inferq-worker"]["spec"]
    assert pdb["selector"]["matchLabels"] == selector
    assert pdb["maxUnavailable"] == 1  # never minAvailable: one replica must not block a node drain
    service = rendered["Service/inferq-worker-metrics"]["spec"]
    assert service["selector"] == selector
    assert service["ports"][0]["targetPort"] == "metrics"


def test_the_images_are_set_by_kustomize_the_api_its_own(rendered: dict[str, dict[str, Any]]) -> None:
    # The worker runs the Dockerfile's default target (core, s3, postgres); the API its api target (+ http).
    for deployment, image_name in (("inferq-worker", "inferq"), ("inferq-api", "inferq-api")):
        (container,) = rendered[f"Deployment/{deployment}"]["spec"]["template"]["spec"]["containers"]
        image = container["image"]
        assert re.fullmatch(rf"[\w./-]+/{image_name}:\d+\.\d+\.\d+", image), image


@pytest.fixture(scope="module")
def api_pod(rendered: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = rendered["Deployment/inferq-api"]["spec"]["template"]["spec"]
    return spec


def test_the_api_serves_on_its_http_port_with_probes_on_the_health_endpoints(api_pod: dict[str, Any]) -> None:
    (container,) = api_pod["containers"]
    assert container["args"] == ["serve"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e for e in container["env"]}
    assert ports["http"] == int(env["INFERQ_HTTP_PORT"]["value"]) == GatewaySettings.model_fields["http_port"].default
    readiness, liveness = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert (readiness["path"], readiness["port"]) == ("/v2/health/ready", "http")
    assert (liveness["path"], liveness["port"]) == ("/v2/health/live", "http")


def test_the_api_stops_gracefully_within_its_termination_grace(api_pod: dict[str, Any], config: dict[str, str]) -> None:
    shutdown_grace_s = float(config["INFERQ_SHUTDOWN_GRACE_S"])
    assert GatewaySettings.model_fields["shutdown_grace_s"].default <= shutdown_grace_s
    pre_stop = api_pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    pre_stop_s = float(re.findall(r"sleep\((\d+(?:\.\d+)?)\)", pre_stop[-1])[0])
    assert api_pod["terminationGracePeriodSeconds"] > shutdown_grace_s + pre_stop_s


def test_the_api_runs_non_root_read_only_with_secrets_by_reference(api_pod: dict[str, Any]) -> None:
    assert api_pod["securityContext"]["runAsNonRoot"] is True
    (container,) = api_pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    env = {e["name"]: e for e in container["env"]}
    assert {"INFERQ_AMQP_URL", "INFERQ_API_TOKEN", "INFERQ_RESULT_STORE", "INFERQ_OPERATIONS_STORE"} <= set(env)
    for name, entry in env.items():
        if name == "INFERQ_AMQP_URL":  # the broker's node addresses, credentials by reference, as for workers
            assert not CREDENTIALS_IN_URL.search(SECRET_REFERENCE.sub("", entry["value"]))
        elif SECRET_NAME.search(name) or name in {"INFERQ_RESULT_STORE", "INFERQ_OPERATIONS_STORE"}:
            assert entry["valueFrom"]["secretKeyRef"]["name"] in {"inferq-secrets", BROKER_USER_SECRET}, name


def test_the_api_service_selects_only_api_pods_and_the_worker_service_only_workers(
    rendered: dict[str, dict[str, Any]],
) -> None:
    api_labels = rendered["Deployment/inferq-api"]["spec"]["template"]["metadata"]["labels"]
    worker_labels = rendered["Deployment/inferq-worker"]["spec"]["template"]["metadata"]["labels"]
    api_service = rendered["Service/inferq-api"]["spec"]
    worker_service = rendered["Service/inferq-worker-metrics"]["spec"]
    assert api_service["selector"].items() <= api_labels.items()
    assert not api_service["selector"].items() <= worker_labels.items()
    assert not worker_service["selector"].items() <= api_labels.items()
    assert api_service["ports"][0]["targetPort"] == "http"
    pdb = rendered["PodDisruptionBudget/inferq-worker"]["spec"]["selector"]["matchLabels"]
    assert not pdb.items() <= api_labels.items()


# -- the broker: a RabbitMQ cluster through the Cluster Operator -------------------------------------


@pytest.fixture(scope="module")
def broker(rendered: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = rendered["RabbitmqCluster/inferq-rabbitmq"]["spec"]
    return spec


def broker_config(broker: dict[str, Any]) -> dict[str, str]:
    lines = broker["rabbitmq"]["additionalConfig"].splitlines()
    pairs = [line.split("=", 1) for line in lines if "=" in line and not line.lstrip().startswith("#")]
    return {key.strip(): value.strip() for key, value in pairs}


def test_the_broker_is_three_nodes_one_per_host_pausing_a_minority(broker: dict[str, Any]) -> None:
    # Quorum queues keep a replica on three nodes and need a majority: an odd count, at least three.
    assert broker["replicas"] == QUORUM_GROUP_SIZE == 3
    settings = broker_config(broker)
    assert settings["cluster_partition_handling"] == "pause_minority"
    assert int(settings["quorum_queue.initial_cluster_size"]) == QUORUM_GROUP_SIZE
    anti = broker["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    assert anti[0]["labelSelector"]["matchLabels"] == {"app.kubernetes.io/name": "inferq-rabbitmq"}


def test_the_broker_consumer_timeout_is_what_the_workers_are_told(
    broker: dict[str, Any], config: dict[str, str]
) -> None:
    consumer_timeout_s = int(broker_config(broker)["consumer_timeout"]) / 1000
    told = float(config.get("INFERQ_BROKER_CONSUMER_TIMEOUT_S", WorkerSettings().broker_consumer_timeout_s))
    assert consumer_timeout_s >= told
    job_timeout_s = float(config.get("INFERQ_JOB_TIMEOUT_S", WorkerSettings().job_timeout_s))
    assert job_timeout_s < told


def test_workers_are_given_every_node_of_the_broker(pod: dict[str, Any], broker: dict[str, Any]) -> None:
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    urls = split_urls(env["INFERQ_AMQP_URL"]["value"])
    hosts = [urlsplit(url).hostname for url in urls]
    # the operator's pod addresses: <cluster>-server-<i>.<cluster>-nodes
    assert hosts == [f"inferq-rabbitmq-server-{i}.inferq-rabbitmq-nodes" for i in range(broker["replicas"])]
    assert {urlsplit(url).port for url in urls} == {5672}
    for url in urls:
        assert url.startswith("amqp://$(RABBITMQ_USERNAME):$(RABBITMQ_PASSWORD)@")
    refs = {name: env[name]["valueFrom"]["secretKeyRef"] for name in ("RABBITMQ_USERNAME", "RABBITMQ_PASSWORD")}
    assert refs == {
        "RABBITMQ_USERNAME": {"name": BROKER_USER_SECRET, "key": "username"},
        "RABBITMQ_PASSWORD": {"name": BROKER_USER_SECRET, "key": "password"},
    }
    # Kubernetes substitutes $(VAR) only from variables defined earlier in the list
    names = [e["name"] for e in container["env"]]
    assert names.index("RABBITMQ_PASSWORD") < names.index("INFERQ_AMQP_URL")
    # and the worker accepts the list as its settings
    substituted = SECRET_REFERENCE.sub("x", env["INFERQ_AMQP_URL"]["value"])
    assert len(WorkerSettings(amqp_url=substituted).amqp_urls) == broker["replicas"]
