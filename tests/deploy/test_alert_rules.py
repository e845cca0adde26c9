"""deploy/prometheus/alerts.yml: promtool accepts the rules and their unit tests pass, every alert has a
test that fires it and one that keeps it silent, the series they read are the ones inferq and RabbitMQ
really export, and compose and Kubernetes carry exactly these rules."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pika
import pytest
import yaml
from private_broker import PrivateBroker, free_port
from prometheus_client.parser import text_string_to_metric_families

from inferq.model_store.manifest import Manifest
from inferq.monitoring.counting import Monitor
from inferq.monitoring.reference import Reference, describe_inputs, describe_outputs
from inferq.monitoring.statistics import DEFAULT_MIN_ROWS, PSI_DRIFT, psi
from inferq.monitoring.store import FileMonitorStore
from inferq.shared.broker.amqp import declare_topology
from inferq.shared.config.settings import InferqSettings
from inferq.shared.contract.messages import Datatype, OutputTensor, Result, Status
from inferq.worker.consumer import Delivery
from inferq.worker.live_performance import ACCURACY, LABELED
from inferq.worker.metrics import WorkerMetrics
from inferq.worker.processor import Outcome

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
K8S = ROOT / "deploy" / "k8s"
METRIC_NAME = re.compile(r"\b((?:inferq|rabbitmq)_[a-z_]+)\b")
LABEL_METRICS = {ACCURACY, LABELED}
"""Live accuracy from delayed labels: computed from the result store at a scrape, tested with the labels."""


@pytest.fixture(scope="module")
def promtool() -> str:
    """promtool on PATH; fail (never skip) when the setup did not install it."""
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed: run scripts/ensure-promtool.sh (make test does)", pytrace=False)
    return found


@pytest.fixture(scope="module")
def rules() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return loaded


def alerts(rules: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule}


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_accepts_every_rule(promtool: str) -> None:
    done = run(promtool, "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_rule_unit_tests_pass(promtool: str) -> None:
    assert RULE_TESTS, "no promtool unit tests in deploy/prometheus/tests"
    done = run(promtool, "test", "rules", *map(str, RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAILED" not in done.stdout


def test_the_alerts_cover_what_must_wake_someone(rules: dict[str, Any]) -> None:
    assert set(alerts(rules)) >= {
        "InferqBacklogWithoutConsumer",
        "InferqBacklogTooOld",
        "InferqDeadLettersGrowing",
        "InferqFailedResultsHigh",
        "InferqInputDrift",
        "InferqOutputDrift",
        "InferqLiveAccuracyLow",
        "InferqInstanceDown",
        "InferqApiAbsent",
    }
    for name, rule in alerts(rules).items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_keeps_it_silent(rules: dict[str, Any]) -> None:
    fired: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    assert set(alerts(rules)) - fired == set(), "alerts no test fires"
    assert set(alerts(rules)) - silent == set(), "alerts no test keeps silent"


def test_the_drift_alerts_use_the_thresholds_of_monitor_drift(rules: dict[str, Any]) -> None:
    for name in ("InferqInputDrift", "InferqOutputDrift"):
        expr = " ".join(alerts(rules)[name]["expr"].split())
        assert f"_psi:1h >= {PSI_DRIFT}" in expr
        assert f"_rows:increase1h >= {DEFAULT_MIN_ROWS}" in expr


def test_the_psi_prometheus_records_is_the_psi_monitor_drift_reports(promtool: str, tmp_path: Path) -> None:
    # Given four bins counted by two workers (one bin empty) against a reference
    reference = [0.1, 0.2, 0.3, 0.4]
    per_minute = {"w1": [7, 3, 0, 11], "w2": [5, 6, 0, 2]}
    expected = psi(reference, [60 * (a + b) for a, b in zip(*per_minute.values(), strict=True)])
    series = []
    for worker, rates in per_minute.items():
        for bin_, (share, rate) in enumerate(zip(reference, rates, strict=True)):
            labels = f'instance="{worker}", model="m", version="3", feature="f", bin="{bin_}"'
            series.append({"series": f"inferq_feature_bin_total{{{labels}}}", "values": f"0+{rate}x120"})
            series.append({"series": f"inferq_feature_reference_ratio{{{labels}}}", "values": f"{share}x120"})
    unit = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        # When Prometheus records an hour of it: the same PSI, to the 9th decimal
                        "expr": f"abs(inferq:feature_psi:1h - {expected!r}) < bool 1e-9",
                        "eval_time": "90m",
                        "exp_samples": [{"labels": '{model="m", version="3", feature="f"}', "value": 1}],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "psi-test.yml"
    path.write_text(yaml.safe_dump(unit))
    done = run(promtool, "test", "rules", str(path))
    # Then promtool agrees with monitoring.statistics.psi
    assert done.returncode == 0, f"PSI {expected}: " + done.stdout + done.stderr


# -- the series the rules read exist ------------------------------------------------------------------


def _worker_sample_names(tmp: Path) -> set[str]:
    """Every sample name a worker exports once it finished a job of a version with a reference."""
    metrics = WorkerMetrics()
    now_ms = time.time() * 1000
    result = Result(
        id="j1",
        model="m",
        requested_version="1",
        version=1,
        status=Status.SUCCEEDED,
        outputs=[],
        worker="w:1",
    )
    delivery = Delivery(1, 1, False, "j1", None, None, now_ms - 5, now_ms, pika.BasicProperties(), b"{}")
    metrics.observe_processed([], [Outcome(delivery, result)])
    rows = np.arange(40, dtype=np.float32).reshape(20, 2)
    labels = np.array([0, 1] * 10)
    reference = Reference(
        rows=20, features=describe_inputs("X", rows, ["a", "b"]), outputs=describe_outputs({"label": labels})
    )
    monitor = Monitor(FileMonitorStore(tmp), 60, "w:1")
    monitor.register(metrics.registry)
    label = OutputTensor(name="label", shape=[20], datatype=Datatype.INT64, data=labels.tolist())
    monitor.observe(Manifest.model_construct(name="m", version=1, reference=reference), [{"X": rows}], [[label]])
    text = metrics.render().decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def _used_metrics(rules: dict[str, Any]) -> set[str]:
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return {name for expr in exprs for name in METRIC_NAME.findall(expr)}


def test_every_inferq_series_the_rules_read_is_one_a_worker_exports(rules: dict[str, Any], tmp_path: Path) -> None:
    used = {name for name in _used_metrics(rules) if name.startswith("inferq_")}
    assert used >= LABEL_METRICS
    exported = _worker_sample_names(tmp_path) | LABEL_METRICS
    assert used <= exported, f"rules read series no worker exports: {used - exported}"


@pytest.mark.broker
def test_every_rabbitmq_series_the_rules_read_is_one_the_rabbitmq_plugin_exports(rules: dict[str, Any]) -> None:
    # Given a RabbitMQ node with its Prometheus plugin, inferq's queues, and one job waiting
    port = free_port()
    node = PrivateBroker(
        config=f"prometheus.tcp.port = {port}\nprometheus.tcp.ip = 127.0.0.1\n", plugins="[rabbitmq_prometheus]"
    )
    try:
        node.start()
        settings = InferqSettings(amqp_url=node.url)
        connection = pika.BlockingConnection(pika.URLParameters(node.url))
        channel = connection.channel()
        declare_topology(channel, settings)
        channel.confirm_delivery()
        channel.basic_publish("", settings.jobs_queue, b"{}", pika.BasicProperties(delivery_mode=2))
        connection.close()
        # When Prometheus would scrape it (queue stats are refreshed every few seconds)
        samples = _wait_for_queue_samples(port, settings.jobs_queue)
    finally:
        node.stop()
    # Then every rabbitmq_ series the rules read is there, per queue, with the labels they match on
    used = {name for name in _used_metrics(rules) if name.startswith("rabbitmq_")}
    assert used, "the rules read no RabbitMQ series"
    for name in used:
        queues = {s["queue"] for s in samples.get(name, []) if s.get("vhost") == "/"}
        assert {settings.jobs_queue, settings.dlq_queue} <= queues, f"{name}: {sorted(queues)}"
    ready = {s["queue"]: s["value"] for s in samples["rabbitmq_queue_messages_ready"]}
    assert ready[settings.jobs_queue] == 1.0 and ready[settings.dlq_queue] == 0.0


def _wait_for_queue_samples(port: int, queue: str, timeout_s: float = 30.0) -> dict[str, list[dict[str, Any]]]:
    deadline = time.monotonic() + timeout_s
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics/per-object", timeout=5) as response:
            text = response.read().decode()
        samples: dict[str, list[dict[str, Any]]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, []).append({**s.labels, "value": s.value})
        ready = {s.get("queue"): s["value"] for s in samples.get("rabbitmq_queue_messages_ready", [])}
        if ready.get(queue) == 1.0 or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


# -- compose and Kubernetes carry the same rules ---------------------------------------------------------


def test_compose_prometheus_loads_the_rules_beside_its_config(promtool: str) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    volumes = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in volumes
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]  # relative to the config file, in the repo as in the container
    done = run(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_and_kubernetes_scrape_under_the_job_names_the_rules_match(rules: dict[str, Any]) -> None:
    matched = set(re.findall(r"inferq-(?:worker|api)", alerts(rules)["InferqInstanceDown"]["expr"]))
    assert matched == {"inferq-worker", "inferq-api"}
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert matched <= {job["job_name"] for job in config["scrape_configs"]}
    monitors = list(yaml.safe_load_all((K8S / "prometheus-podmonitors.yaml").read_text()))
    jobs = {
        relabel["replacement"]
        for monitor in monitors
        for endpoint in monitor["spec"]["podMetricsEndpoints"]
        for relabel in endpoint["relabelings"]
        if relabel["targetLabel"] == "job"
    }
    assert jobs == matched | {"rabbitmq"}
    rabbitmq = next(m for m in monitors if m["metadata"]["name"] == "inferq-rabbitmq")
    assert rabbitmq["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics/per-object"


def test_the_kubernetes_prometheus_rule_holds_exactly_the_compose_rules(rules: dict[str, Any]) -> None:
    stale = run(sys.executable, str(ROOT / "scripts" / "render_prometheus_rule.py"), "--check")
    assert stale.returncode == 0, stale.stderr
    rendered = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True).stdout
    (rule,) = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == rules["groups"]
