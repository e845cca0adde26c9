"""Write deploy/rabbitmq/definitions.json from shared/broker/topology.py, so the broker definitions that the
compose stack imports can never drift from what the worker and producer declare.

    python scripts/render_definitions.py          # rewrite the file
    python scripts/render_definitions.py --check  # exit 1 when the file is stale (used by the tests)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inferq.shared.broker.topology import ALL_RESULTS, all_queues  # noqa: E402
from inferq.shared.config.settings import InferqSettings  # noqa: E402

TARGET = ROOT / "deploy" / "rabbitmq" / "definitions.json"


def render(settings: InferqSettings, vhost: str = "/") -> str:
    """The queues inferq owns, with their exact arguments, and the results exchange they are bound to,
    as RabbitMQ definitions JSON."""
    queues: list[dict[str, Any]] = [
        {"name": spec.name, "vhost": vhost, "durable": True, "auto_delete": False, "arguments": spec.arguments}
        for spec in all_queues(settings)
    ]
    specs = all_queues(settings)
    exchanges = sorted({name for spec in specs for name in spec.bound_to})
    definitions = {
        "queues": queues,
        "exchanges": [
            {"name": name, "vhost": vhost, "type": "topic", "durable": True, "auto_delete": False, "internal": False}
            for name in exchanges
        ],
        "bindings": [
            {
                "source": name,
                "vhost": vhost,
                "destination": spec.name,
                "destination_type": "queue",
                "routing_key": ALL_RESULTS,
                "arguments": {},
            }
            for spec in specs
            for name in spec.bound_to
        ],
    }
    return json.dumps(definitions, indent=2, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail when the file differs instead of writing it")
    args = parser.parse_args()
    # The defaults, whatever INFERQ_* says here: the compose stack runs with the default names and limits.
    wanted = render(InferqSettings.model_construct())
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != wanted:
            print(f"{TARGET.relative_to(ROOT)} is stale: run python scripts/render_definitions.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(wanted)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
