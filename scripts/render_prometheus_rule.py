"""Write deploy/k8s/prometheus-rule.yaml (a Prometheus Operator ``PrometheusRule``) from
deploy/prometheus/alerts.yml, so Kubernetes and the compose stack alert on exactly the same rules.

    python scripts/render_prometheus_rule.py          # rewrite the file
    python scripts/render_prometheus_rule.py --check  # exit 1 when the file is stale (used by the tests)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "deploy" / "prometheus" / "alerts.yml"
TARGET = ROOT / "deploy" / "k8s" / "prometheus-rule.yaml"
HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by scripts/render_prometheus_rule.py: edit that file, then
# run the script (a test fails while this one is stale). inferq's alerting and recording rules for a
# Prometheus run by the Prometheus Operator; the PodMonitors in prometheus-podmonitors.yaml give the
# scraped series the job names the rules match (inferq-worker, inferq-api, rabbitmq).
"""


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (PromQL over several lines) as literal blocks, as a person would."""


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _string)


def render(rules: dict[str, Any]) -> str:
    """The PrometheusRule manifest holding ``rules``' groups unchanged."""
    manifest = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "inferq", "labels": {"app.kubernetes.io/name": "inferq"}},
        "spec": {"groups": rules["groups"]},
    }
    return HEADER + yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail when the file differs instead of writing it")
    args = parser.parse_args()
    text = render(yaml.safe_load(SOURCE.read_text()))
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET.relative_to(ROOT)} is stale: run python scripts/render_prometheus_rule.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
