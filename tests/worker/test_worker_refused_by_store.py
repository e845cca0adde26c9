"""A result store that refuses, as opposed to one that is down: a value it cannot hold fails only its own
job (``result_refused``) and the batch goes on; a store that refuses us (a revoked privilege, a missing
bucket) stops the worker with exit code 2 and one line, acking nothing: every job stays queued."""

from __future__ import annotations

import contextlib
import http.server
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from onnx import TensorProto, helper
from postgres_support import SHARED_URL, schema_url
from support import S3_BUCKET, Env, audit, wait_for

from inferq.model_store.base import publish
from inferq.shared.contract.messages import Job, Status, Tensor
from inferq.shared.errors import ErrorCode
from inferq.shared.results.stores import open_result_store
from inferq.worker.worker import build_worker

pytestmark = [pytest.mark.broker]

JOBS = 2_000
NUL_EVERY = 397
"""One job in this many echoes a text with a NUL character (a few per run)."""


def echo_onnx() -> bytes:
    """A model whose string output is its string input: a NUL in the input is a NUL in the result."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["echo"])],
        "echo",
        [helper.make_tensor_value_info("text", TensorProto.STRING, [None, 1])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, [None, 1])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def echo_job(text: str) -> Job:
    tensor = Tensor(name="text", shape=[1, 1], datatype="BYTES", data=[text])
    return Job(id=uuid.uuid4().hex, model="echo", version=1, inputs=[tensor])


def echo_jobs(count: int) -> list[Job]:
    return [echo_job(f"row {i}\u0000end" if i % NUL_EVERY == 7 else f"row {i}") for i in range(count)]


@pytest.fixture
def echo_env(env: Env) -> Env:
    publish(env.store, "echo", echo_onnx())
    return env


def drain_within(env: Env, timeout_s: float) -> None:
    """Drain the jobs queue with one in-process worker; fail (and stop it) if it has not finished in time."""
    worker = build_worker(env.worker_settings(store_retry_max_s=0.5), drain=True)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        worker.consumer.call_threadsafe(worker.request_stop)
        thread.join(60)
        pytest.fail(f"the worker did not finish in {timeout_s:g} s (it retried a refused result forever)")


@pytest.mark.postgres
def test_results_postgresql_refuses_fail_only_their_jobs_and_thousands_of_others_are_stored(
    echo_env: Env, postgres_url: str
) -> None:
    # Given thousands of jobs on a PostgreSQL result store, a few of whose string outputs hold a NUL
    echo_env.result_location = postgres_url
    jobs = echo_jobs(JOBS)
    with_nul = {j.id for j in jobs if "\u0000" in str(j.inputs[0].data[0])}
    assert 3 <= len(with_nul) <= 10
    echo_env.submit(jobs)
    # When one worker drains the queue
    drain_within(echo_env, timeout_s=120)
    # Then each of those jobs has one failed result saying the store refused it, and every other job
    # its result, stored exactly once (the audit)
    stored = echo_env.stored()
    for job_id in with_nul:
        assert stored[job_id].status is Status.FAILED
        assert stored[job_id].error is not None and stored[job_id].error.code is ErrorCode.RESULT_REFUSED
        assert "UntranslatableCharacter" in stored[job_id].error.message
    assert all(stored[j.id].status is Status.SUCCEEDED for j in jobs if j.id not in with_nul)
    report = audit(echo_env, {j.id: j for j in jobs})
    assert report.stored == JOBS


class _NoSuchBucket(http.server.BaseHTTPRequestHandler):
    """Every request is answered as AWS S3 answers one for a bucket that does not exist."""

    def _refuse(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = b"<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message></Error>"
        self.send_response(404)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _refuse

    def log_message(self, *_args: object) -> None:
        pass


@contextlib.contextmanager
def no_such_bucket_endpoint() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoSuchBucket)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_worker_cli(env: Env, timeout_s: float = 90, **extra: str) -> subprocess.CompletedProcess[str]:
    """``inferq worker`` (not draining: it must stop by itself), failing the test if it does not."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "inferq", "worker"],
            env=env.environ(INFERQ_STORE_RETRY_MAX_S="0.5", INFERQ_METRICS_PORT="0", **extra),
            text=True,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else str(exc.stderr or "")
        tail = "\n".join(stderr.splitlines()[-15:])
        pytest.fail(f"the worker was still running after {timeout_s:g} s (retrying a refused store?):\n{tail}")


def assert_refused_and_nothing_acked(env: Env, done: subprocess.CompletedProcess[str], jobs: list[Job]) -> str:
    """The worker exited 2 with one line, and every job is still queued: nothing acked or dead-lettered."""
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("inferq: error: the result store refuses this worker: "), last
    wait_for(lambda: env.depth(env.jobs_queue) == len(jobs), timeout_s=30)
    assert env.depth(f"{env.jobs_queue}.dlq") == 0 and env.depth(f"{env.jobs_queue}.retry") == 0
    assert env.depth(env.results_queue) == 0
    return last


@pytest.fixture
def writer_role(postgres_url: str) -> Iterator[tuple[str, str]]:
    """A login role owning nothing, with every privilege on the store's tables (its URL, and its name)."""
    schema = postgres_url.rsplit("search_path%3D", 1)[1]
    opened = open_result_store(postgres_url)
    opened.count()  # creates the tables
    opened.close()
    role = f"w_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(SHARED_URL, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"GRANT USAGE, CREATE ON SCHEMA {schema} TO {role}")
        admin.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO {role}")
        try:
            yield schema_url(SHARED_URL.replace("postgres@", f"{role}@"), schema), role
        finally:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")


@pytest.mark.postgres
def test_a_revoked_postgresql_privilege_stops_the_worker_with_exit_2_and_nothing_acked(
    echo_env: Env, postgres_url: str, writer_role: tuple[str, str]
) -> None:
    # Given a worker role whose INSERT privilege was revoked, and jobs queued
    url, role = writer_role
    schema = postgres_url.rsplit("search_path%3D", 1)[1]
    with psycopg.connect(SHARED_URL, autocommit=True) as admin:
        admin.execute(f"REVOKE INSERT ON {schema}.inferq_results FROM {role}")
    echo_env.result_location = url
    jobs = [echo_job(f"row {i}") for i in range(300)]
    echo_env.submit(jobs)
    # When a worker starts on it
    done = run_worker_cli(echo_env)
    # Then it exits 2 with one line naming the store and the reason, and every job is still queued
    line = assert_refused_and_nothing_acked(echo_env, done, jobs)
    assert "postgresql://" in line and "InsufficientPrivilege" in line
    # And once the privilege is back, the jobs are all served, each once
    with psycopg.connect(SHARED_URL, autocommit=True) as admin:
        admin.execute(f"GRANT INSERT ON {schema}.inferq_results TO {role}")
    echo_env.result_location = postgres_url
    drain_within(echo_env, timeout_s=60)
    assert audit(echo_env, {j.id: j for j in jobs}).stored == len(jobs)


@pytest.mark.s3
def test_a_missing_s3_bucket_stops_the_worker_with_exit_2_and_nothing_acked(echo_env: Env, seaweedfs: object) -> None:
    # Given a result store in a bucket that does not exist, on an S3 endpoint that answers as AWS does
    # (404 NoSuchBucket). NOTE: not SeaweedFS: it answers 403 on a quiet machine, but under the whole suite's
    # load it was seen to leave such a PUT unanswered (a timeout, rightly retried as transient).
    del seaweedfs
    echo_env.result_location = f"s3://no-bucket-{uuid.uuid4().hex[:8]}/results"
    jobs = [echo_job(f"row {i}") for i in range(200)]
    echo_env.submit(jobs)
    # When a worker starts on it
    with no_such_bucket_endpoint() as endpoint:
        done = run_worker_cli(echo_env, AWS_ENDPOINT_URL=endpoint)
    # Then it exits 2 with one line naming the bucket, and every job is still queued
    line = assert_refused_and_nothing_acked(echo_env, done, jobs)
    assert echo_env.result_location.split("/")[2] in line
    assert "inferq-test-secret" not in done.stderr  # the secret key of the test server
    # And on a bucket that exists, every job is served once
    echo_env.result_location = f"s3://{S3_BUCKET}/{echo_env.prefix}/results"
    drain_within(echo_env, timeout_s=60)
    assert audit(echo_env, {j.id: j for j in jobs}).stored == len(jobs)
