"""``python -m bench.backfill`` (``make bench-backfill``): ``inferq backfill --out`` against a pandas script on
the same file and model, in one invocation.

The data set (:mod:`bench.churn`: 2,000,000 customers by default, fixed seed) is scored twice: by the pandas
script a data scientist would write (``read_csv``, ``predict_proba``, ``to_csv``) and by ``inferq backfill
big.csv --model churn --id-column customer_id --out preds.csv`` with default settings, two ``inferq worker``
processes and the default SQLite result store. The two outputs must agree row by row (ids in the same order,
probabilities within 1e-6); then the wall times, rows/s, the ratio inferq / pandas, each phase's share and
the backfill's peak RSS are printed.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import joblib
import numpy as np
import pandas as pd  # type: ignore[import-untyped]
import pika
import pyarrow.csv as pacsv

from bench.churn import FEATURES, ID_COLUMN, DataSet, generate

AMQP_URL = os.environ.get("INFERQ_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
TOLERANCE = 1e-6
WORKERS = 2
_COLLECTED = re.compile(r"waited ([\d.]+)s for workers, read results ([\d.]+)s, wrote ([\d.]+)s")


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.backfill", description=__doc__)
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows in the generated file")
    parser.add_argument("--data-dir", type=Path, default=Path("var/bench-backfill"), help="where the data set is kept")
    return parser.parse_args()


@dataclass(slots=True)
class Timed:
    """One run's wall time and its phases, in seconds."""

    wall_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float | None = None


def pandas_script(data: DataSet, out: Path) -> Timed:
    """What a data scientist runs: read the CSV, predict, write the predictions with pandas."""
    timed = Timed()
    started = time.perf_counter()
    pipeline = joblib.load(data.model)
    frame = pd.read_csv(data.csv)
    read = time.perf_counter()
    probabilities = pipeline.predict_proba(frame[list(FEATURES)])
    predicted = time.perf_counter()
    result = pd.DataFrame(
        {ID_COLUMN: frame[ID_COLUMN], "probabilities_0": probabilities[:, 0], "probabilities_1": probabilities[:, 1]}
    )
    result.to_csv(out, index=False)
    done = time.perf_counter()
    timed.wall_s = done - started
    timed.phases = {"read": read - started, "predict": predicted - read, "write": done - predicted}
    return timed


@dataclass(frozen=True, slots=True)
class World:
    """A private corner for the inferq run: its queues and stores."""

    root: Path
    prefix: str

    def environ(self) -> dict[str, str]:
        return {
            **os.environ,
            "INFERQ_AMQP_URL": AMQP_URL,
            "INFERQ_JOBS_QUEUE": f"{self.prefix}.jobs",
            "INFERQ_RESULTS_QUEUE": f"{self.prefix}.results",
            "INFERQ_MODEL_STORE": str(self.root / "models"),
            "INFERQ_RESULT_STORE": f"sqlite:{self.root / 'results.db'}",
            "INFERQ_LOG_LEVEL": "warning",
        }

    def inferq(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "inferq", *args]


def inferq_backfill(data: DataSet, out: Path, world: World) -> Timed:
    """Publish the model, start the workers, and time ``inferq backfill … --out`` with its peak RSS."""
    env = world.environ()
    subprocess.run(
        world.inferq("models", "publish", "churn", str(data.model)), env=env, check=True, stdout=subprocess.DEVNULL
    )
    workers = [
        subprocess.Popen(world.inferq("worker"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(WORKERS)
    ]
    try:
        time.sleep(2.0)  # the workers connect and declare their queues before the clock starts
        return _timed_backfill(data, out, world, env)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def _timed_backfill(data: DataSet, out: Path, world: World, env: dict[str, str]) -> Timed:
    command = world.inferq("backfill", str(data.csv), "--model", "churn", "--id-column", ID_COLUMN, "--out", str(out))
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=_read_lines, args=(process.stdout, lines, started), daemon=True)
    reader.start()
    peak_mb = peak_rss_mb(process)
    ended = time.perf_counter() - started
    reader.join()
    if process.returncode != 0:
        raise SystemExit(f"inferq backfill exited {process.returncode}: {' / '.join(text for _, text in lines)}")
    return _phases(lines, ended, peak_mb)


def peak_rss_mb(process: subprocess.Popen[str], every_s: float = 0.02) -> float:
    """The peak resident memory of ``process`` (its ``VmHWM``, read until it exits), in MB.

    NOTE: not ``wait4``'s ``ru_maxrss``: Linux carries the forking parent's high-water mark into the child
    across ``exec``, so this script's own pandas frame would be counted as the backfill's."""
    peak_kb = 0
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            text = status.read_text()
        except OSError:
            break
        found = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
        if found is not None:
            peak_kb = max(peak_kb, int(found.group(1)))
        time.sleep(every_s)
    process.wait()
    return peak_kb / 1024


def _read_lines(stream: IO[str], lines: list[tuple[float, str]], started: float) -> None:
    for line in stream:
        lines.append((time.perf_counter() - started, line.strip()))


def _phases(lines: list[tuple[float, str]], wall_s: float, peak_rss_mb: float) -> Timed:
    """The backfill's phases from what it printed: checked and published (until ``published …``), then
    waiting for the workers, reading results and writing the file (its closing line's own figures)."""
    published = next(at for at, text in lines if text.startswith("published "))
    collected = next((_COLLECTED.search(text) for _, text in lines if _COLLECTED.search(text)), None)
    phases = {"read, check and publish": published}
    if collected is not None:
        waited, read, wrote = (float(collected.group(i)) for i in (1, 2, 3))
        phases.update({"wait for workers": waited, "read results": read, "write output": wrote})
        phases["other (re-plan ids, start-up)"] = max(0.0, wall_s - published - waited - read - wrote)
    return Timed(wall_s, phases, peak_rss_mb)


def compare(pandas_out: Path, inferq_out: Path) -> int:
    """The rows the two outputs disagree on (ids in order, both probabilities within :data:`TOLERANCE`)."""
    ours = pacsv.read_csv(inferq_out, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    theirs = pacsv.read_csv(pandas_out)
    if ours.num_rows != theirs.num_rows:
        raise SystemExit(f"inferq wrote {ours.num_rows} rows, pandas {theirs.num_rows}")
    ids_ours = np.asarray(ours.column(ID_COLUMN).to_numpy(), dtype=np.int64)
    ids_theirs = np.asarray(theirs.column(ID_COLUMN).to_numpy(), dtype=np.int64)
    wrong = ids_ours != ids_theirs
    for name in ("probabilities_0", "probabilities_1"):
        wrong |= np.abs(ours.column(name).to_numpy() - theirs.column(name).to_numpy()) > TOLERANCE
    return int(wrong.sum())


def _delete_queues(prefix: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        for suffix in ("jobs", "results", "jobs.dlq"):
            channel.queue_delete(f"{prefix}.{suffix}")
    finally:
        connection.close()


def report(rows: int, pandas: Timed, inferq: Timed, wrong: int) -> str:
    """The figures, as a Markdown table and the phases' shares."""
    ratio = pandas.wall_s / inferq.wall_s
    lines = [
        f"rows: {rows:,}; outputs agree on every row: {'yes' if wrong == 0 else f'NO ({wrong} rows differ)'}",
        f"load average at the end: {os.getloadavg()[0]:.2f}, {os.getloadavg()[1]:.2f}, {os.getloadavg()[2]:.2f}",
        "",
        "| run | wall time | rows/s |",
        "|---|---|---|",
        f"| pandas script (read_csv, predict_proba, to_csv) | {pandas.wall_s:.1f} s | {rows / pandas.wall_s:,.0f} |",
        f"| inferq backfill --out, {WORKERS} workers, SQLite | {inferq.wall_s:.1f} s | {rows / inferq.wall_s:,.0f} |",
        "",
        f"inferq / pandas: {ratio:.2f}x (target >= 0.25x); backfill peak RSS: {inferq.peak_rss_mb:.0f} MB (< 600 MB)",
        "",
    ]
    for name, timed in (("pandas", pandas), ("inferq", inferq)):
        shares = ", ".join(
            f"{phase} {seconds:.1f} s ({seconds / timed.wall_s:.0%})" for phase, seconds in timed.phases.items()
        )
        lines.append(f"{name} phases: {shares}")
    return "\n".join(lines)


def main() -> None:
    args = _args()
    print(f"generating {args.rows:,} rows in {args.data_dir} (once per size) ...", flush=True)
    data = generate(args.data_dir, args.rows)
    with tempfile.TemporaryDirectory(prefix="bench-backfill-") as tmp:
        root = Path(tmp)
        print("pandas script ...", flush=True)
        pandas = pandas_script(data, root / "pandas.csv")
        world = World(root, f"bench-backfill.{uuid.uuid4().hex[:8]}")
        print("inferq backfill ...", flush=True)
        try:
            inferq = inferq_backfill(data, root / "preds.csv", world)
        finally:
            _delete_queues(world.prefix)
        wrong = compare(root / "pandas.csv", root / "preds.csv")
    print(report(data.rows, pandas, inferq, wrong))
    if wrong:
        sys.exit(1)


if __name__ == "__main__":
    main()
