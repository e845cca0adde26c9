"""Writers racing on the same result ids over S3, where a conditional PUT that meets another one still in
progress is answered 409 ``ConditionalRequestConflict`` (as AWS S3 does) and the winner's object is not
readable yet: the loser waits for it instead of failing or inventing an answer.

SeaweedFS decides conditional writes when they complete (412, then readable), so a proxy in front of the
real server plays S3's part: it answers 409 to a conditional PUT of a key whose PUT it is still
forwarding, and forwards everything else as it is."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from seaweedfs import SeaweedFS
from support import S3_BUCKET, wait_for

from inferq.shared.results.stores import open_result_store

pytestmark = pytest.mark.s3

IDS = 2_000
IN_FLIGHT_S = 0.02
"""How long the proxy holds a conditional PUT before forwarding it: the window in which others get 409."""
CONFLICT = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ConditionalRequestConflict</Code>'
    b"<Message>A conflicting operation occurred.</Message></Error>"
)


class ConflictingS3:
    """An HTTP proxy to an S3 server that answers 409 to a conditional PUT racing one in progress."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream).netloc
        self.conflicts = 0
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: object) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conditional = self.command == "PUT" and self.headers.get("If-None-Match") == "*"
                if conditional and not proxy.begin(self.path):
                    self._answer(409, {"Content-Type": "application/xml"}, CONFLICT)
                    return
                try:
                    if conditional:
                        time.sleep(IN_FLIGHT_S)
                    status, headers, data = proxy.send(self.command, self.path, dict(self.headers.items()), body)
                finally:
                    if conditional:
                        proxy.end(self.path)
                self._answer(status, headers, data)

            def _answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() not in ("content-length", "connection", "transfer-encoding", "date", "server"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._local = threading.local()
        self._upstreams: list[http.client.HTTPConnection] = []

    def begin(self, path: str) -> bool:
        with self._lock:
            if path in self._in_flight:
                self.conflicts += 1
                return False
            self._in_flight.add(path)
            return True

    def end(self, path: str) -> None:
        with self._lock:
            self._in_flight.discard(path)

    def send(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None
    ) -> tuple[int, dict[str, str], bytes]:
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = http.client.HTTPConnection(self.upstream, timeout=30)
            with self._lock:
                self._upstreams.append(connection)
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()

    def __enter__(self) -> ConflictingS3:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        with self._lock:
            for connection in self._upstreams:
                connection.close()


@pytest.fixture
def conflicting_s3(seaweedfs: SeaweedFS) -> Iterator[ConflictingS3]:
    with ConflictingS3(seaweedfs.endpoint) as proxy:
        yield proxy


RACER = """
import json, pathlib, sys, time
from inferq.shared.results.stores import open_result_store
from inferq.shared.contract.messages import Result, Status, Tensor
location, name, count, gate = sys.argv[1], sys.argv[2], int(sys.argv[3]), pathlib.Path(sys.argv[4])
ids = [f"race-{i}" for i in range(count)]  # the same order in every racer: they meet on every id
store = open_result_store(location)
(gate / f"{name}.ready").touch()
while not (gate / "go").exists():  # all start together, whatever their imports cost
    time.sleep(0.002)
seen = {}
for start in range(0, count, 100):
    batch = [
        Result(id=i, model="iris", requested_version=1, version=1, status=Status.SUCCEEDED, worker=name,
               outputs=[Tensor(name="y", shape=[1], datatype="INT64", data=[1])])
        for i in ids[start:start + 100]
    ]
    for mine, stored in zip(batch, store.put_many(batch)):
        seen[mine.id] = stored.worker
store.close()
print(json.dumps(seen))
"""


def test_writers_racing_through_409_conflicts_agree_on_one_result_per_id(
    conflicting_s3: ConflictingS3, tmp_path: Path
) -> None:
    # Given three writers storing results of the same thousands of ids at once, through an S3 that
    # answers 409 to a write racing another still in progress
    location = f"s3://{S3_BUCKET}/race-{uuid.uuid4().hex[:8]}/results"
    environ = {**os.environ, "AWS_ENDPOINT_URL": conflicting_s3.endpoint}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, location, f"racer-{n}", str(IDS), str(tmp_path)],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        for n in range(3)
    ]
    wait_for(lambda: len(list(tmp_path.glob("*.ready"))) == len(racers) or any(r.poll() for r in racers), 120)
    (tmp_path / "go").touch()
    views = []
    for racer in racers:
        out, err = racer.communicate(timeout=180)
        assert racer.returncode == 0, err[-3000:]
        views.append(json.loads(out))
    # Then each id has one stored result, and every writer was told that one (none read "nothing yet")
    store = open_result_store(location)
    try:
        stored = {r.id: r.worker for r in store.scan()}
    finally:
        store.close()
    assert conflicting_s3.conflicts > 0, "no write met another in progress: the race was not run"
    assert len(stored) == IDS
    assert all(view == stored for view in views)
    print(f"{IDS} ids, 3 writers: {conflicting_s3.conflicts} writes answered 409")
