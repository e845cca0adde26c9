"""A soak on a private three-node RabbitMQ cluster: a producer and three workers stay busy while a
seeded random schedule kills workers (``kill -9``), kills and restarts nodes, cuts a node off from the
others and stalls the result store. It ends with the audit and exits non-zero on any lost job or any id
with two different results.

    make chaos DURATION=10m [SEED=7]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS), str(TESTS.parent)]

from private_broker import PrivateBroker, PrivateCluster  # noqa: E402
from support import Env, make_job  # noqa: E402

from inferq.model_store.base import publish  # noqa: E402
from inferq.model_store.convert import estimator_to_onnx  # noqa: E402
from inferq.producer.client import Producer  # noqa: E402
from inferq.shared.contract.messages import Job, Result  # noqa: E402

WORKERS = 3


def duration_s(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 10m)")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)


class Fleet:
    """The workers, each a real ``inferq worker`` process given every node, restarted when killed."""

    def __init__(self, env: Env, cluster: PrivateCluster) -> None:
        self.env, self.cluster = env, cluster
        self.procs: list[subprocess.Popen[bytes]] = [self._start(i) for i in range(WORKERS)]

    def _start(self, i: int) -> subprocess.Popen[bytes]:
        log = (self.env.tmp / f"worker-{i}.log").open("a")
        return subprocess.Popen(
            [sys.executable, "-m", "inferq", "worker"],
            env=self.env.environ(
                INFERQ_AMQP_URL=self.cluster.url,
                INFERQ_CONNECT_TIMEOUT_S="120",
                INFERQ_HEARTBEAT_S="5",
                INFERQ_METRICS_PORT="0",
                INFERQ_STORE_RETRY_MAX_S="2",
            ),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )

    def kill_one(self, rng: random.Random) -> str:
        i = rng.randrange(len(self.procs))
        self.procs[i].kill()
        self.procs[i].wait()
        self.procs[i] = self._start(i)
        return f"worker {i} killed (-9) and restarted"

    def stop(self) -> list[int]:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=120))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        return codes


class Stream:
    """A producer publishing jobs until stopped; a new producer takes over if one gives up."""

    def __init__(self, env: Env, cluster: PrivateCluster, models: list[bytes]) -> None:
        self.env, self.cluster = env, cluster
        self.confirmed: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        import numpy as np  # noqa: PLC0415

        self._rows = np.random.default_rng(0).normal(size=(150, 4)).astype(np.float32) + 4
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _jobs(self) -> Iterator[Job]:
        i = 0
        while not self._stop.is_set():
            if i % 20 == 0:
                time.sleep(0.1)  # ~200 jobs/s: the workers keep up between faults
            yield make_job(self._rows[i % 150 : i % 150 + 1], version=1 + i % 2)
            i += 1

    def _run(self) -> None:
        settings = self.env.producer_settings(
            amqp_url=self.cluster.url, confirm_window=200, connect_timeout_s=120, heartbeat_s=5
        )
        while not self._stop.is_set():
            try:
                with Producer(settings) as producer:
                    producer.publish_many(self._jobs(), on_confirmed=self.confirmed.append)
            except Exception as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                say(f"producer gave up ({type(exc).__name__}: {exc}); a new one takes over")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=300)


def stall_store(env: Env, seconds: float) -> str:
    """The result store disappears (a plain file where its directory was), then comes back."""
    aside = env.tmp / "results-aside"
    env.result_dir.rename(aside)
    env.result_dir.write_text("the result store is away")
    time.sleep(seconds)
    env.result_dir.unlink()
    aside.rename(env.result_dir)
    return f"result store stalled for {seconds:.0f}s"


def node_fault(cluster: PrivateCluster, rng: random.Random, *, kill: bool) -> str:
    node: PrivateBroker = rng.choice(cluster.nodes)
    if kill:
        node.kill()
        time.sleep(rng.uniform(3, 15))
        cluster.restart(node)
        return f"node {node.node} killed (-9) and restarted"
    cluster.isolate(node)
    time.sleep(rng.uniform(10, 30))
    cluster.heal(node)
    return f"node {node.node} cut off, then healed"


def read_all(env: Env, queue: str) -> list[bytes]:
    """Take every message in ``queue``, a window at a time (basic.get one by one is slow for 100k)."""
    import pika  # noqa: PLC0415

    connection = pika.BlockingConnection(pika.URLParameters(env.amqp_url))
    channel = connection.channel()
    bodies = []
    for method, _props, body in channel.consume(queue, auto_ack=True, inactivity_timeout=3):
        if method is None:
            break
        bodies.append(body)
    channel.cancel()
    connection.close()
    return bodies


def audit(env: Env, confirmed: list[str]) -> dict[str, int]:
    stored = env.stored()
    dlq = Counter(props.message_id for props, _ in env.read_queue(f"{env.jobs_queue}.dlq"))
    on_queue: dict[str, set[bytes]] = defaultdict(set)
    total = 0
    for body in read_all(env, env.results_queue):
        result = Result.model_validate_json(body)
        on_queue[result.id].add(result.model_dump_json().encode())
        total += 1
    ids = set(confirmed)
    return {
        "confirmed": len(ids),
        "stored": sum(1 for i in ids if i in stored),
        "dead_lettered": sum(1 for i in ids if dlq.get(i)),
        "stored_and_dead_lettered": sum(1 for i in ids if i in stored and dlq.get(i)),
        "lost": sum(1 for i in ids if i not in stored and not dlq.get(i)),
        "results_on_queue": total,
        "duplicates_identical": total - len(on_queue),
        "ids_with_different_results": sum(1 for r in on_queue.values() if len(r) > 1),
        "stored_not_on_queue": sum(1 for i in ids if i in stored and i not in on_queue),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=duration_s, default=duration_s("10m"))
    parser.add_argument("--seed", type=int, default=int(os.environ.get("SEED", "7")))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    # A stop (SIGTERM, Ctrl-C) still takes the private cluster down (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(os.environ.get("CHAOS_DIR", f"/tmp/inferq-chaos-{uuid.uuid4().hex[:8]}"))
    work.mkdir(parents=True, exist_ok=True)
    say(f"chaos: seed {args.seed}, {args.duration:.0f}s, logs in {work}")
    cluster = PrivateCluster()
    cluster.start()
    say("cluster of three nodes formed")
    env = Env(work, f"chaos.{uuid.uuid4().hex[:8]}", amqp_url=cluster.nodes[0].url)
    try:
        from sklearn.datasets import load_iris  # noqa: PLC0415
        from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

        X, y = load_iris(return_X_y=True)
        publish(env.store, "iris", estimator_to_onnx(LogisticRegression(max_iter=500).fit(X, y)))
        publish(env.store, "iris", estimator_to_onnx(LogisticRegression(max_iter=50, C=0.1).fit(X, y)))
        return soak(env, cluster, rng, args.duration)
    finally:
        cluster.stop()


def soak(env: Env, cluster: PrivateCluster, rng: random.Random, seconds: float) -> int:
    fleet = Fleet(env, cluster)
    try:
        return run_schedule(env, cluster, rng, seconds, fleet)
    finally:
        for proc in fleet.procs:
            if proc.poll() is None:
                proc.kill()


def run_schedule(env: Env, cluster: PrivateCluster, rng: random.Random, seconds: float, fleet: Fleet) -> int:
    stream = Stream(env, cluster, [])
    faults: Counter[str] = Counter()
    end = time.monotonic() + seconds
    bag: list[str] = []
    while time.monotonic() < end:
        time.sleep(rng.uniform(5, 20))
        if not bag:  # every kind of fault in each round, in a random order
            bag = ["worker", "worker", "node-kill", "node-cut", "store"]
            rng.shuffle(bag)
        kind = bag.pop()
        if kind == "worker":
            say(fleet.kill_one(rng))
        elif kind.startswith("node"):
            say(node_fault(cluster, rng, kill=kind == "node-kill"))
        else:
            say(stall_store(env, rng.uniform(3, 10)))
        faults[kind] += 1
        say(f"confirmed so far: {len(stream.confirmed)}")
    stream.stop()
    say(f"producing stopped: {len(stream.confirmed)} confirmed; waiting for the workers to catch up")
    deadline = time.monotonic() + 600
    while len(list(env.result_dir.glob("*.json"))) < len(set(stream.confirmed)) and time.monotonic() < deadline:
        time.sleep(2)
    codes = fleet.stop()
    drain = subprocess.run(
        [sys.executable, "-m", "inferq", "worker", "--drain"],
        env=env.environ(INFERQ_AMQP_URL=cluster.url, INFERQ_METRICS_PORT="0", INFERQ_CONNECT_TIMEOUT_S="60"),
        stdout=subprocess.DEVNULL,
        stderr=(env.tmp / "drain.log").open("w"),
        timeout=600,
        check=False,
    )
    report = audit(env, stream.confirmed)
    say(
        f"faults: {dict(faults)}; worker exit codes {codes}, drain {drain.returncode}; producer restarts "
        f"{len(stream.failures)}"
    )
    say("audit: " + ", ".join(f"{k}={v}" for k, v in report.items()))
    bad = report["lost"] or report["ids_with_different_results"] or report["stored_and_dead_lettered"]
    say("FAILED: lost jobs or two different results" if bad else "OK: nothing lost, never two different results")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
