"""The ``inferq`` command: a thin layer that wires settings, stores, producer and worker.

Every failure the user can cause or meet prints one line, ``inferq: error: …``, and exits non-zero;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TextIO, TypeVar

import click
import orjson
from pydantic import ValidationError
from tqdm import tqdm

from inferq.admin.dead_letters import DeadLetter, list_dead_letters, replay
from inferq.admin.status import collect_status, render_status
from inferq.model_store.base import publish, read_table, resolve_version, set_alias
from inferq.model_store.stores import open_model_store
from inferq.producer.backfill import BackfillPlan, backfill_jobs, check_rows, read_rows
from inferq.producer.client import Producer, new_job_id
from inferq.producer.collect import ExpectedJob, expected_jobs, write_backfill_output
from inferq.producer.export import FORMATS, ExportError, copy_results, export, output_format, read_ids, results_of
from inferq.producer.rows import job_from_rows
from inferq.shared.config.logging import configure_logging, redact_text
from inferq.shared.config.settings import (
    InferqSettings,
    OperatorSettings,
    ProducerSettings,
    WorkerSettings,
    load_settings,
)
from inferq.shared.contract.codec import describe_validation_error
from inferq.shared.contract.messages import Job, Result, Tensor, VersionRef, parse_version_ref
from inferq.shared.errors import ConfigError, InferqError, InvalidPayload, StoreError
from inferq.shared.results.base import ResultStore
from inferq.shared.results.stores import open_result_store
from inferq.shared.tables.rowfile import jsonl_records
from inferq.shared.tables.table import RowError, Table

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
@click.option(
    "--sample",
    type=click.Path(path_type=Path),
    help="CSV/JSONL of a few training rows: column names (and text columns) for a model fitted without names.",
)
@click.option(
    "--reference",
    "reference_path",
    type=click.Path(path_type=Path),
    help="Training inputs (.csv with a header, .jsonl rows or .npy): the distribution drift is measured against. "
    "A model that names its columns reads them by name (every column it reads must be there).",
)
@click.option(
    "--feature-names", help="Comma-separated feature names for a --reference of rows by position (default: the header)."
)
def models_publish(
    name: str,
    path: Path,
    version: int | None,
    alias: str | None,
    n_features: int | None,
    sample: Path | None,
    reference_path: Path | None,
    feature_names: str | None,
) -> None:
    """Publish PATH: an .onnx file, or a scikit-learn estimator or pipeline saved as .joblib/.pkl/.pickle
    (converted with skl2onnx; unpickling runs code from the file, so publish only files you trust)."""
    # scikit-learn and skl2onnx take seconds to import: only this command needs them.
    from inferq.model_store.convert import framework_versions, load_model_file  # noqa: PLC0415
    from inferq.monitoring.reference import read_reference  # noqa: PLC0415

    settings = _settings(InferqSettings)
    names = [n.strip() for n in feature_names.split(",")] if feature_names else None
    exported = load_model_file(path, n_features, sample)
    # A model over named columns reads its reference by those names, so the file is read after the export.
    reference = read_reference(reference_path, exported.columns, names) if reference_path is not None else None
    framework = framework_versions() if exported.source.startswith("sklearn:") else {}
    store = open_model_store(settings.model_store)
    manifest = publish(
        store,
        name,
        exported.onnx,
        version=version,
        alias=alias,
        source=exported.source,
        framework=framework,
        columns=exported.columns,
        reference=reference,
    )
    suffix = f" (alias {alias})" if alias else ""
    if manifest.reference is not None:
        suffix += f", reference of {manifest.reference.rows} rows"
    click.echo(f"published {manifest.name} version {manifest.version} sha256 {manifest.sha256[:12]}{suffix}")
    if manifest.columns:
        click.echo("columns: " + ", ".join(f"{c.name}:{c.datatype}" for c in manifest.columns))


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


@models.command("shadow")
@click.argument("name")
@click.option("--target", help="The version or alias that runs in the shadow of the jobs' own version.")
@click.option("--fraction", type=click.FloatRange(min=0, max=1, min_open=True), help="Share of jobs, 0 < F <= 1.")
@click.option("--off", is_flag=True, help="Stop shadow traffic.")
def models_shadow(name: str, target: str | None, fraction: float | None, off: bool) -> None:
    """Run TARGET on a share of NAME's jobs and keep both answers (workers pick it up within
    INFERQ_ALIAS_REFRESH_S); shadow answers never reach the results queue."""
    from inferq.monitoring.shadow_setting import clear_shadow, set_shadow  # noqa: PLC0415

    store = open_model_store(_settings(InferqSettings).model_store)
    if off:
        if target is not None or fraction is not None:
            raise click.UsageError("--off takes no --target or --fraction")
        clear_shadow(store, name)
        click.echo(f"{name}: shadow traffic off")
        return
    if target is None or fraction is None:
        raise click.UsageError("give --target ALIAS|VERSION and --fraction F, or --off")
    version = set_shadow(store, name, _version(target), fraction)
    click.echo(f"{name}: {fraction:g} of jobs also run on {target} (version {version} now)")


# -- worker --------------------------------------------------------------------------------------


@cli.command()
@click.option("--drain", is_flag=True, help="Process until the jobs queue is empty, then exit 0.")
def worker(drain: bool) -> None:
    """Consume jobs, run them in micro-batches, store and publish every result."""
    from inferq.worker.worker import run_worker  # noqa: PLC0415  (the worker's imports are heavy: load on use)

    run_worker(_settings(WorkerSettings), drain=drain)


# -- HTTP ----------------------------------------------------------------------------------------


@cli.command()
def serve() -> None:
    """Serve the HTTP API (Open Inference Protocol requests in, operations out) until SIGTERM/SIGINT."""
    from inferq.gateway.server import serve as run_gateway  # noqa: PLC0415  (FastAPI and uvicorn: load on use)
    from inferq.gateway.settings import GatewaySettings  # noqa: PLC0415

    settings = load_settings(GatewaySettings)
    token = settings.api_token.get_secret_value() if settings.api_token is not None else None
    configure_logging(settings.log_level, settings.log_format, [settings.amqp_url.get_secret_value(), token])
    run_gateway(settings)


# -- producing -----------------------------------------------------------------------------------


def _table(settings: InferqSettings, model: str, version: VersionRef) -> Table:
    return read_table(open_model_store(settings.model_store), model, version)


def _is_tensor(value: object) -> bool:
    """A KServe tensor object (as opposed to a row of named columns)."""
    return isinstance(value, dict) and {"name", "datatype", "shape", "data"} <= value.keys() <= _TENSOR_KEYS


_TENSOR_KEYS = frozenset({"name", "datatype", "shape", "data", "parameters"})


def _job_from_input(settings: InferqSettings, model: str, version: VersionRef, raw: str) -> Job:
    """``--input`` is KServe tensors (a list of tensor objects), one row (an object by column name, or an
    array) or a list of rows."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidPayload(f"--input is not JSON: {exc}") from None
    try:
        if isinstance(value, list) and value and all(_is_tensor(v) for v in value):
            return Job(id=new_job_id(), model=model, version=version, inputs=[Tensor.model_validate(v) for v in value])
        rows = value if isinstance(value, list) and value and isinstance(value[0], list | dict) else [value]
        return job_from_rows(_table(settings, model, version), rows, version=version)
    except RowError as exc:
        raise InvalidPayload(f"--input {exc}") from None
    except (ValidationError, TypeError) as exc:
        detail = describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
        raise InvalidPayload(f"--input: {detail}") from None


def _jobs_from_lines(name: str, handle: BinaryIO) -> Iterator[Job]:
    for record in jsonl_records(name, handle):
        value = record.values
        try:
            if isinstance(value, dict) and "id" not in value:
                value["id"] = new_job_id()
            yield Job.model_validate(value)
        except ValidationError as exc:
            raise InvalidPayload(f"{name}:{record.line}: {describe_validation_error(exc)}") from None


def _jobs_from_row_lines(name: str, handle: BinaryIO, table: Table, version: VersionRef) -> Iterator[Job]:
    """One job per line of rows: each line an object by column name, or an array in column order."""
    for record in jsonl_records(name, handle):
        try:
            yield job_from_rows(table, [record.values], version=version)
        except RowError as exc:
            raise InvalidPayload(f"{name}:{record.line}: {exc.detail}") from None


@cli.command()
@click.argument("jobs_file", required=False, type=click.File("rb"))
@click.option("--model", help="Model name: for --input, or to read JOBS_FILE as rows of that model.")
@click.option("--version", "version", default="latest", show_default=True, help="Version, 'latest' or an alias.")
@click.option("--input", "raw_input", help="One job: a row ({...}), rows ([{...}, ...] or [[...]]) or KServe tensors.")
@click.option("--wait", is_flag=True, help="Wait for the single job's result and print it.")
@click.option("--timeout", "timeout_s", default=60.0, show_default=True, help="Seconds --wait waits.")
def submit(
    jobs_file: BinaryIO | None,
    model: str | None,
    version: str,
    raw_input: str | None,
    wait: bool,
    timeout_s: float,
) -> None:
    """Publish jobs from JOBS_FILE (JSONL of jobs, '-' for stdin), or with --model one job per line of
    rows (objects by column name, or arrays), or one job with --model and --input.

    Prints each job id once the broker has confirmed it."""
    settings = _settings(ProducerSettings)
    if jobs_file is None and (model is None or raw_input is None):
        raise click.UsageError("give JOBS_FILE, JOBS_FILE with --model (rows), or --model with --input")
    if jobs_file is not None and raw_input is not None:
        raise click.UsageError("give either JOBS_FILE or --input, not both")
    ref = _version(version)
    with Producer(settings) as producer:
        if jobs_file is not None:
            name = "<stdin>" if jobs_file.name in ("-", "<stdin>") else str(jobs_file.name)
            jobs = (
                _jobs_from_row_lines(name, jobs_file, _table(settings, model, ref), ref)
                if model is not None
                else _jobs_from_lines(name, jobs_file)
            )
            producer.publish_many(jobs, on_confirmed=_echo_flush)
            return
        assert model is not None and raw_input is not None
        job = _job_from_input(settings, model, ref, raw_input)
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
@click.option(
    "--version", "version", default="latest", show_default=True, help="Version, 'latest' or an alias (resolved once)."
)
@click.option("--id-column", help="Column (or JSON key) holding each row's id.")
@click.option("--batch-rows", default=1, show_default=True, type=click.IntRange(min=1), help="Rows per job.")
@click.option("--out", type=click.Path(path_type=Path), help="Wait for every row's result and write them here.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Format of --out (default: from its suffix).")
def backfill(
    data: Path, model: str, version: str, id_column: str | None, batch_rows: int, out: Path | None, fmt: str | None
) -> None:
    """Turn every row of DATA (.csv with a header, or .jsonl) into jobs for one model version; a rerun
    on the same version skips the rows already finished.

    With --out, then wait for every row's result and write the id column, the error code and the
    outputs, in input order (.csv or .jsonl)."""
    settings = _settings(ProducerSettings)
    out_format = output_format(out, fmt) if out is not None else None
    table = _table(settings, model, _version(version))  # 'latest' or an alias: resolved once, here
    results = open_result_store(settings.result_store)
    total = check_rows(data, read_rows(data, table, id_column))  # the whole file, before any publish
    plan = BackfillPlan()
    with tqdm(total=total, unit="row", desc="backfill", file=sys.stderr, dynamic_ncols=True) as bar:
        jobs = backfill_jobs(
            read_rows(data, table, id_column),
            table=table,
            batch_rows=batch_rows,
            results=results,
            plan=plan,
            on_skip=lambda rows: _advance(bar, rows),
        )
        with Producer(settings) as producer:
            producer.publish_many(jobs, on_confirmed=lambda _id: _advance(bar, min(batch_rows, total - int(bar.n))))
    click.echo(
        f"published {plan.jobs} jobs ({plan.rows} rows) on {model} version {table.version}, "
        f"skipped {plan.skipped_jobs} already finished"
    )
    if out is not None and out_format is not None:
        expected = expected_jobs(read_rows(data, table, id_column), model, table.version, batch_rows)
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


# -- monitoring ----------------------------------------------------------------------------------


@cli.group()
def monitor() -> None:
    """Drift of live inputs and outputs against each version's reference."""


@monitor.command("drift")
@click.argument("model")
@click.option("--version", "version", default="latest", show_default=True, help="Version number or alias.")
@click.option("--since", help="Only windows that started this long ago or later: 30m, 1h, 7d (default: all).")
@click.option("--min-rows", default=1000, show_default=True, type=click.IntRange(min=1), help="Fewer: insufficient.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
@click.option("--plot", type=click.Path(path_type=Path), help="Draw reference and live shares per feature (PNG).")
def monitor_drift(model: str, version: str, since: str | None, min_rows: int, as_json: bool, plot: Path | None) -> None:
    """PSI, Jensen-Shannon distance, chi-square p-value and a status per feature and output of MODEL.

    Exits 0 whether or not drift is found."""
    from inferq.monitoring.drift_report import drift_report, parse_since, plot_drift, render_drift  # noqa: PLC0415
    from inferq.monitoring.store import open_monitor_store  # noqa: PLC0415

    try:
        since_s = parse_since(since) if since is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    settings = _settings(InferqSettings)
    monitor_store = open_monitor_store(settings.result_store)
    try:
        report = drift_report(
            open_model_store(settings.model_store),
            monitor_store,
            model,
            _version(version),
            since_s=since_s,
            min_rows=min_rows,
        )
    finally:
        monitor_store.close()
    if plot is not None:
        try:
            plot_drift(report, plot)
        except ImportError:
            raise ConfigError("--plot needs matplotlib: pip install 'inferq[monitor]'") from None
    if as_json:
        click.echo(orjson.dumps(report.to_dict()).decode())
    else:
        click.echo("\n".join(render_drift(report)))


@monitor.command("shadow")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of text.")
def monitor_shadow(model: str, as_json: bool) -> None:
    """Agreement of MODEL's shadow version with the version that answered, over the stored pairs.

    A pair is one sampled job (skipped ones aside), whether or not the answering version succeeded:
    errors counts the pairs whose answering version failed the job (input checks included) and those
    whose shadow version failed it; agreement and differences cover the pairs where both answered."""
    from inferq.monitoring.shadow_report import render_shadow, shadow_report  # noqa: PLC0415
    from inferq.monitoring.store import open_monitor_store  # noqa: PLC0415

    settings = _settings(InferqSettings)
    monitor_store = open_monitor_store(settings.result_store)
    try:
        report = shadow_report(open_model_store(settings.model_store), monitor_store, model)
    finally:
        monitor_store.close()
    click.echo(orjson.dumps(report.to_dict()).decode() if as_json else "\n".join(render_shadow(report)))


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
