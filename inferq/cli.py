"""The ``inferq`` command: a thin layer that wires settings, stores, producer and worker.

Every failure the user can cause or meet prints one line, ``inferq: error: …``, and exits non-zero;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO, TypeVar

import click
import orjson
from pydantic import ValidationError
from tqdm import tqdm

from model_store.base import publish, resolve_version, set_alias
from model_store.manifest import Manifest
from model_store.stores import open_model_store
from operations.dlq import DeadLetter, list_dead_letters, replay
from operations.status import collect_status, render_status
from producer.backfill import BackfillPlan, InputSpec, backfill_jobs, read_rows
from producer.client import Producer, new_job_id
from producer.collect import ExpectedJob, expected_jobs, write_backfill_output
from producer.export import FORMATS, ExportError, copy_results, export, output_format, read_ids, results_of
from shared.codec import describe_validation_error
from shared.errors import ConfigError, InferqError, InvalidPayload, StoreError
from shared.logging import configure_logging, redact_text
from shared.messages import Job, Result, Tensor, VersionRef, parse_version_ref
from shared.results import ResultStore, open_result_store
from shared.settings import InferqSettings, OperatorSettings, ProducerSettings, WorkerSettings, load_settings

S = TypeVar("S", bound=InferqSettings)
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _settings(cls: type[S]) -> S:
    settings = load_settings(cls)
    configure_logging(settings.log_level, settings.log_format, [settings.amqp_url.get_secret_value()])
    return settings


def _version(value: str) -> VersionRef:
    try:
        return parse_version_ref(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group()
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """inferq: asynchronous ONNX inference on RabbitMQ."""
    ctx.obj = {"debug": debug}


# -- models --------------------------------------------------------------------------------------


@cli.group()
def models() -> None:
    """Publish, list and alias model versions in the model store (INFERQ_MODEL_STORE)."""


@models.command("publish")
@click.argument("name")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--version", "version", type=click.IntRange(min=1), help="Version number (default: next).")
@click.option("--alias", help="Point this alias at the new version.")
@click.option("--n-features", type=click.IntRange(min=1), help="Input width, for estimators that do not record it.")
def models_publish(name: str, path: Path, version: int | None, alias: str | None, n_features: int | None) -> None:
    """Publish PATH (.onnx, or a pickled/joblib scikit-learn estimator, converted with skl2onnx)."""
    # scikit-learn and skl2onnx take seconds to import: only this command needs them.
    from model_store.export import framework_versions, load_model_file  # noqa: PLC0415

    settings = _settings(InferqSettings)
    data, source = load_model_file(path, n_features)
    framework = framework_versions() if source.startswith("sklearn:") else {}
    store = open_model_store(settings.model_store)
    manifest = publish(store, name, data, version=version, alias=alias, source=source, framework=framework)
    suffix = f" (alias {alias})" if alias else ""
    click.echo(f"published {manifest.name} version {manifest.version} sha256 {manifest.sha256[:12]}{suffix}")


@models.command("list")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON manifest per line.")
def models_list(name: str | None, as_json: bool) -> None:
    """List models, their versions and aliases."""
    store = open_model_store(_settings(InferqSettings).model_store)
    names = [name] if name else store.list_models()
    if name and not store.list_versions(name):
        resolve_version(store, name, "latest")  # raises a clear unknown-model error
    rows = []
    for model in names:
        aliases = store.read_aliases(model)
        for version in store.list_versions(model):
            manifest = store.read_manifest(model, version)
            tags = sorted(a for a, v in aliases.items() if v == version)
            rows.append((manifest, tags))
    if as_json:
        for manifest, tags in rows:
            click.echo(orjson.dumps({**manifest.model_dump(mode="json"), "aliases": tags}).decode())
        return
    click.echo(f"{'MODEL':<20} {'VERSION':>7}  {'SHA256':<12}  {'CREATED':<20} {'INPUTS':<24} ALIASES")
    for manifest, tags in rows:
        inputs = ", ".join(
            f"{i.name}:{i.datatype}{['N' if d is None else d for d in i.shape]}" for i in manifest.inputs
        )
        created = manifest.created_at.strftime("%Y-%m-%d %H:%M:%S")
        click.echo(
            f"{manifest.name:<20} {manifest.version:>7}  {manifest.sha256[:12]:<12}  {created:<20} "
            f"{inputs:<24} {','.join(tags)}"
        )


@models.command("alias")
@click.argument("name")
@click.argument("alias")
@click.argument("version", type=click.IntRange(min=1))
def models_alias(name: str, alias: str, version: int) -> None:
    """Point ALIAS of model NAME at VERSION (workers pick it up within INFERQ_ALIAS_REFRESH_S)."""
    store = open_model_store(_settings(InferqSettings).model_store)
    set_alias(store, name, alias, version)
    click.echo(f"{name} {alias} -> version {version}")


# -- worker --------------------------------------------------------------------------------------


@cli.command()
@click.option("--drain", is_flag=True, help="Process until the jobs queue is empty, then exit 0.")
def worker(drain: bool) -> None:
    """Consume jobs, run them in micro-batches, store and publish every result."""
    from worker.main import run_worker  # noqa: PLC0415  (the worker's imports are heavy: load on use)

    run_worker(_settings(WorkerSettings), drain=drain)


# -- producing -----------------------------------------------------------------------------------


def _input_spec(manifest: Manifest) -> InputSpec:
    if len(manifest.inputs) != 1 or len(manifest.inputs[0].shape) != 2:
        raise InvalidPayload(f"model {manifest.name!r} does not take one 2-D input; send KServe tensors instead")
    spec = manifest.inputs[0]
    return InputSpec(spec.name, spec.datatype, spec.shape[1])


def _manifest(settings: InferqSettings, model: str, version: VersionRef) -> Manifest:
    store = open_model_store(settings.model_store)
    return store.read_manifest(model, resolve_version(store, model, version))


def _job_from_input(settings: InferqSettings, model: str, version: VersionRef, raw: str) -> Job:
    """``--input`` is KServe tensors (a list of objects) or rows of numbers (one row or a list of rows)."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidPayload(f"--input is not JSON: {exc}") from None
    try:
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            inputs = [Tensor.model_validate(v) for v in value]
        else:
            rows = value if isinstance(value, list) and value and isinstance(value[0], list) else [value]
            spec = _input_spec(_manifest(settings, model, version))
            flat = [x for row in rows for x in row]
            shape = [len(rows), len(rows[0])]
            inputs = [Tensor(name=spec.name, shape=shape, datatype=spec.datatype, data=flat)]
        return Job(id=new_job_id(), model=model, version=version, inputs=inputs)
    except (ValidationError, TypeError) as exc:
        detail = describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
        raise InvalidPayload(f"--input: {detail}") from None


def _jobs_from_lines(lines: Iterator[str]) -> Iterator[Job]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = orjson.loads(line)
            if isinstance(value, dict) and "id" not in value:
                value["id"] = new_job_id()
            yield Job.model_validate(value)
        except orjson.JSONDecodeError as exc:
            raise InvalidPayload(f"line {number}: not JSON ({exc})") from None
        except ValidationError as exc:
            raise InvalidPayload(f"line {number}: {describe_validation_error(exc)}") from None


@cli.command()
@click.argument("jobs_file", required=False, type=click.File("r"))
@click.option("--model", help="Model name, for a single job built from --input.")
@click.option("--version", "version", default="latest", show_default=True, help="Version, 'latest' or an alias.")
@click.option("--input", "raw_input", help="JSON rows ([[...], ...]) or KServe tensors for a single job.")
@click.option("--wait", is_flag=True, help="Wait for the single job's result and print it.")
@click.option("--timeout", "timeout_s", default=60.0, show_default=True, help="Seconds --wait waits.")
def submit(
    jobs_file: TextIO | None,
    model: str | None,
    version: str,
    raw_input: str | None,
    wait: bool,
    timeout_s: float,
) -> None:
    """Publish jobs from JOBS_FILE (JSONL, '-' for stdin), or one job with --model and --input.

    Prints each job id once the broker has confirmed it."""
    settings = _settings(ProducerSettings)
    if (jobs_file is None) == (model is None):
        raise click.UsageError("give either JOBS_FILE or --model with --input")
    with Producer(settings) as producer:
        if jobs_file is not None:
            producer.publish_many(_jobs_from_lines(iter(jobs_file)), on_confirmed=_echo_flush)
            return
        assert model is not None
        if raw_input is None:
            raise click.UsageError("--model needs --input")
        job = _job_from_input(settings, model, _version(version), raw_input)
        if not wait:
            _echo_flush(producer.publish(job))
            return
        result = producer.request(job, timeout_s)
        click.echo(result.model_dump_json(indent=2))
        if result.error is not None:
            sys.exit(EXIT_FAILURE)


def _echo_flush(text: str) -> None:
    click.echo(text)
    sys.stdout.flush()


@cli.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--model", required=True, help="Model name.")
@click.option("--version", "version", default="latest", show_default=True, help="Version, 'latest' or an alias.")
@click.option("--id-column", help="Column (or JSON key) holding each row's job id.")
@click.option("--batch-rows", default=1, show_default=True, type=click.IntRange(min=1), help="Rows per job.")
@click.option("--out", type=click.Path(path_type=Path), help="Wait for every row's result and write them here.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Format of --out (default: from its suffix).")
def backfill(
    data: Path, model: str, version: str, id_column: str | None, batch_rows: int, out: Path | None, fmt: str | None
) -> None:
    """Turn every row of DATA (.csv with a header, or .jsonl) into jobs; a rerun skips finished ones.

    With --out, then wait for every row's result and write the id column, the error code and the
    outputs, in input order (.csv or .jsonl)."""
    settings = _settings(ProducerSettings)
    ref = _version(version)
    out_format = output_format(out, fmt) if out is not None else None
    spec = _input_spec(_manifest(settings, model, ref))
    results = open_result_store(settings.result_store)
    total = sum(1 for _ in read_rows(data, id_column))
    plan = BackfillPlan()
    with tqdm(total=total, unit="row", desc="backfill", file=sys.stderr, dynamic_ncols=True) as bar:
        jobs = backfill_jobs(
            read_rows(data, id_column),
            model=model,
            version=ref,
            spec=spec,
            batch_rows=batch_rows,
            results=results,
            plan=plan,
            on_skip=lambda rows: _advance(bar, rows),
        )
        with Producer(settings) as producer:
            producer.publish_many(jobs, on_confirmed=lambda _id: _advance(bar, min(batch_rows, total - int(bar.n))))
    click.echo(f"published {plan.jobs} jobs ({plan.rows} rows), skipped {plan.skipped_jobs} already finished")
    if out is not None and out_format is not None:
        expected = expected_jobs(read_rows(data, id_column), model, ref, batch_rows)
        _collect(results, expected, out, out_format, id_column or "line", total)


def _collect(store: ResultStore, expected: Iterable[ExpectedJob], out: Path, fmt: str, header: str, total: int) -> None:
    with tqdm(total=total, unit="row", desc="finished", file=sys.stderr, dynamic_ncols=True) as bar:
        try:
            rows = write_backfill_output(store, expected, out, fmt, header, lambda n: _advance(bar, n))
        except KeyboardInterrupt:
            bar.close()
            click.echo(
                f"inferq: interrupted: {int(bar.n)} of {total} rows finished; the jobs stay queued. Run the same "
                "command again to resume: it publishes nothing twice and waits for the rest.",
                err=True,
            )
            sys.exit(130)
    click.echo(f"wrote {rows} rows to {out}")


def _advance(bar: tqdm[Any], rows: float) -> None:
    bar.update(rows)


# -- results -------------------------------------------------------------------------------------


@cli.group()
def results() -> None:
    """Read the result store (INFERQ_RESULT_STORE)."""


@results.command("get")
@click.argument("job_id")
def results_get(job_id: str) -> None:
    """Print the stored result of JOB_ID; exit 1 when there is none."""
    store = open_result_store(_settings(InferqSettings).result_store)
    try:
        result = store.get(job_id)
    except ValidationError as exc:
        raise StoreError(
            f"the stored result of job {job_id!r} is unreadable: {describe_validation_error(exc)}"
        ) from None
    click.echo(result.model_dump_json(indent=2))


@results.command("export")
@click.option("--ids", "ids_file", type=click.Path(path_type=Path), help="Export these job ids (one a line).")
@click.option("--model", help="Export the results of this model only.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="csv or jsonl (default: from --out, else csv).")
@click.option("--out", type=click.Path(path_type=Path), help="Write here instead of standard output.")
def results_export(ids_file: Path | None, model: str | None, fmt: str | None, out: Path | None) -> None:
    """Stream results as CSV (id,status,version,error_code,outputs…) or JSON lines (one result each)."""
    if ids_file is not None and model is not None:
        raise click.UsageError("give --ids or --model, not both")
    chosen = output_format(out, fmt)
    store = open_result_store(_settings(InferqSettings).result_store)
    if ids_file is not None:
        ids = read_ids(ids_file)
        total: int | None = len(ids)
        source: Iterable[tuple[str, Result | None]] = results_of(store, ids)
    else:
        total = store.count(model)
        source = ((r.id, r) for r in store.scan(model))
    with _output(out) as handle, _bar(total, "exported") as bar:
        written, missing = export(source, handle, chosen, lambda: _advance(bar, 1))
    suffix = f", {missing} ids without a result" if missing else ""
    click.echo(f"exported {written} results{suffix}", err=True)


@results.command("copy")
@click.argument("source")
@click.argument("target")
def results_copy(source: str, target: str) -> None:
    """Copy every result from the store at SOURCE to the store at TARGET (same forms as INFERQ_RESULT_STORE);
    ids TARGET already has are skipped, so an interrupted copy can simply be run again."""
    _settings(InferqSettings)  # logging
    origin = open_result_store(source, setting="SOURCE")
    destination = open_result_store(target, setting="TARGET")
    try:
        with _bar(origin.count(), "copied") as bar:
            report = copy_results(origin, destination, lambda n: _advance(bar, n))
    finally:
        origin.close()
        destination.close()
    click.echo(f"copied {report.copied} results, skipped {report.skipped} already in {destination.describe()}")


@contextmanager
def _output(out: Path | None) -> Iterator[TextIO]:
    if out is None:
        yield sys.stdout
        return
    try:
        handle = out.open("w", newline="")
    except OSError as exc:
        raise ExportError(f"{out}: {exc.strerror}") from None
    with handle:
        yield handle


def _bar(total: int | None, desc: str) -> tqdm[Any]:
    # A progress bar on a terminal only: a pipe or a log file gets the summary line alone.
    return tqdm(total=total, unit="result", desc=desc, file=sys.stderr, disable=not sys.stderr.isatty())


# -- operating -----------------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
def status(as_json: bool) -> None:
    """Queue depths and consumers (jobs, results, DLQ), and the models, versions and aliases in the store."""
    report = collect_status(_settings(OperatorSettings))
    click.echo(orjson.dumps(report.to_dict()).decode() if as_json else "\n".join(render_status(report)))


@cli.group()
def dlq() -> None:
    """Inspect and replay the dead-letter queue (<INFERQ_JOBS_QUEUE>.dlq)."""


@dlq.command("list")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1), help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per dead letter.")
def dlq_list(limit: int, as_json: bool) -> None:
    """Show dead-lettered jobs, oldest first, with the reason; removes nothing."""
    settings = _settings(OperatorSettings)
    letters, total = list_dead_letters(settings, limit)
    for letter in letters:
        if as_json:
            click.echo(orjson.dumps(letter).decode())
        else:
            click.echo(
                f"{letter.message_id or '-':<40} {letter.model or '-':<16} {letter.size_bytes:>8}B  {letter.reason}"
            )
    if not as_json:
        click.echo(f"{len(letters)} shown of {total} in {settings.dlq_queue}")


@dlq.command("replay")
@click.option("--id", "job_id", help="Replay the dead letter with this job id.")
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter.")
def dlq_replay(job_id: str | None, replay_all: bool) -> None:
    """Republish dead letters to the jobs queue; each leaves the DLQ only once the broker confirmed its copy.

    Prints each replayed id as soon as it is safe."""
    if (job_id is None) == (not replay_all):
        raise click.UsageError("give either --id ID or --all")
    replayed = replay(_settings(OperatorSettings), job_id=job_id, on_replayed=_echo_replayed)
    click.echo(f"replayed {len(replayed)}", err=True)


def _echo_replayed(letter: DeadLetter) -> None:
    # A dead letter without an AMQP message id (published by hand, or a body that was never a job)
    # is still replayed: say so, with what is known about it, rather than print "None".
    _echo_flush(letter.message_id or f"(no id: {letter.size_bytes}B, reason {letter.reason})")


# -- entry point ---------------------------------------------------------------------------------

T = TypeVar("T")


def _run(entry: Callable[..., T], args: list[str] | None) -> int:
    debug = "--debug" in (args if args is not None else sys.argv[1:])
    try:
        entry.main(args=args, prog_name="inferq", standalone_mode=False)  # type: ignore[attr-defined]
    except click.exceptions.Abort:
        click.echo("inferq: aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (InferqError, TimeoutError, OSError) as exc:
        if debug:
            raise
        click.echo(f"inferq: error: {redact_text(str(exc))}", err=True)
        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_FAILURE
    return 0


def main(args: list[str] | None = None) -> Any:
    """Console-script entry point."""
    sys.exit(_run(cli, args))
