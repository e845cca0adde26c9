"""``inferq models``: publish, list, alias (guarded, with a history) and shadow model versions in the model store."""

from __future__ import annotations

from pathlib import Path

import click
import orjson

from inferq.cli.common import Group, settings, version_ref
from inferq.model_store.base import ModelStore, publish, resolve_version, set_alias
from inferq.model_store.guard import GuardRecord, GuardState, read_guards
from inferq.model_store.history import AliasMove, GuardSpec, read_history
from inferq.model_store.manifest import Manifest
from inferq.model_store.stores import open_model_store
from inferq.monitoring.performance import prediction_rule
from inferq.shared.config.settings import InferqSettings
from inferq.shared.errors import NotGuardable


@click.group(cls=Group)
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
    # An .onnx file needs only onnx; a pickle imports scikit-learn and skl2onnx (seconds, and the sklearn extra).
    from inferq.model_store.model_file import load_model_file  # noqa: PLC0415
    from inferq.monitoring.reference import read_reference  # noqa: PLC0415

    loaded = settings(InferqSettings)
    names = [n.strip() for n in feature_names.split(",")] if feature_names else None
    exported = load_model_file(path, n_features, sample)
    # A model over named columns reads its reference by those names, so the file is read after the export.
    reference = read_reference(reference_path, exported.columns, names) if reference_path is not None else None
    framework = _framework_versions() if exported.source.startswith("sklearn:") else {}
    store = open_model_store(loaded.model_store)
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
    store = open_model_store(settings(InferqSettings).model_store)
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
    _echo_table(rows)


def _echo_table(rows: list[tuple[Manifest, list[str]]]) -> None:
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
@click.option(
    "--guard-error-rate",
    type=click.FloatRange(min=0, max=1, max_open=True),
    help="Move the alias back by itself if more than this share (0 <= R < 1) of the jobs it sends to VERSION fail.",
)
@click.option(
    "--guard-min-accuracy",
    type=click.FloatRange(min=0, max=1, min_open=True),
    help="Move the alias back by itself if VERSION's labeled predictions are less accurate than this (0 < A <= 1).",
)
@click.option(
    "--guard-window",
    type=click.IntRange(min=1),
    help="How many jobs with results (error rate) or labeled predictions (accuracy), from jobs resolved through "
    "ALIAS to VERSION, the guard waits for before it judges.",
)
@click.option("--reason", default="", help="Why: kept in the alias history.")
def models_alias(
    name: str,
    alias: str,
    version: int,
    guard_error_rate: float | None,
    guard_min_accuracy: float | None,
    guard_window: int | None,
    reason: str,
) -> None:
    """Point ALIAS of model NAME at VERSION (workers pick it up within INFERQ_ALIAS_REFRESH_S). With
    --guard-error-rate and/or --guard-min-accuracy, and --guard-window, the workers watch the move and undo
    it if too many jobs fail or too many labeled predictions are wrong."""
    watches = guard_error_rate is not None or guard_min_accuracy is not None
    if watches != (guard_window is not None):
        raise click.UsageError("give --guard-window with --guard-error-rate and/or --guard-min-accuracy")
    store = open_model_store(settings(InferqSettings).model_store)
    guard = None
    if guard_window is not None:
        guard = GuardSpec(error_rate=guard_error_rate, min_accuracy=guard_min_accuracy, window=guard_window)
    if guard_min_accuracy is not None:
        _check_classifier(store, name, version)
    move = set_alias(store, name, alias, version, guard=guard, reason=reason)
    was = "" if move.from_version is None else f" (was {move.from_version})"
    watched = "" if guard is None else f"; guarded: back to {move.from_version} if {guard.describe()}"
    click.echo(f"{name} {alias} -> version {version}{was}{watched}")


def _check_classifier(store: ModelStore, name: str, version: int) -> None:
    """A guard on accuracy needs a version whose prediction is a class (see inferq monitor performance)."""
    rule = prediction_rule(store.read_manifest(name, resolve_version(store, name, version)))
    if not rule.classifier:
        raise NotGuardable(
            f"version {version} of {name!r} predicts numbers ({rule.output!r}): accuracy needs a classifier"
        )


@models.command("history")
@click.argument("name")
@click.option("--alias", "only", help="Only this alias's moves.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per move.")
def models_history(name: str, only: str | None, as_json: bool) -> None:
    """Every move of NAME's aliases, oldest first: when, from, to, by whom (user@host, or a guard), why; and
    where each guard stands now."""
    store = open_model_store(settings(InferqSettings).model_store)
    if not store.list_versions(name):
        resolve_version(store, name, "latest")  # raises a clear unknown-model error
    moves = [m for m in read_history(store, name) if only is None or m.alias == only]
    guards = {g.id: g for g in read_guards(store, name).values()}
    if as_json:
        for move in moves:
            guard = guards.get(move.id)
            status = None if guard is None else guard.model_dump(mode="json", include=_GUARD_STATUS)
            click.echo(orjson.dumps({**move.model_dump(mode="json"), "guard_status": status}).decode())
        return
    click.echo(f"{'WHEN (UTC)':<20} {'ALIAS':<12} {'FROM':>5} {'TO':>5}  {'BY':<24} WHY")
    for move in moves:
        when = move.at.strftime("%Y-%m-%d %H:%M:%S")
        was = "-" if move.from_version is None else str(move.from_version)
        why = "; ".join(part for part in (move.reason, _guard_note(move, guards.get(move.id))) if part)
        click.echo(f"{when:<20} {move.alias:<12} {was:>5} {move.to_version:>5}  {move.by:<24} {why}")


_GUARD_STATUS = {"state", "succeeded", "failed", "labeled", "correct", "reason"}


def _guard_note(move: AliasMove, guard: GuardRecord | None) -> str:
    if move.guard is None:
        return ""
    note = f"guarded: {move.guard.describe()}"
    if guard is not None and guard.state is GuardState.WATCHING:
        so_far = []
        if move.guard.error_rate is not None:
            so_far.append(f"{guard.failed} of {guard.counted} failed")
        if move.guard.min_accuracy is not None:
            so_far.append(f"{guard.correct} of {guard.labeled} labeled right")
        note += f" (watching: {', '.join(so_far)} so far)"
    return note


@models.command("shadow")
@click.argument("name")
@click.option("--target", help="The version or alias that runs in the shadow of the jobs' own version.")
@click.option("--fraction", type=click.FloatRange(min=0, max=1, min_open=True), help="Share of jobs, 0 < F <= 1.")
@click.option("--off", is_flag=True, help="Stop shadow traffic.")
def models_shadow(name: str, target: str | None, fraction: float | None, off: bool) -> None:
    """Run TARGET on a share of NAME's jobs and keep both answers (workers pick it up within
    INFERQ_ALIAS_REFRESH_S); shadow answers never reach the results queue."""
    from inferq.monitoring.shadow_setting import clear_shadow, set_shadow  # noqa: PLC0415

    store = open_model_store(settings(InferqSettings).model_store)
    if off:
        if target is not None or fraction is not None:
            raise click.UsageError("--off takes no --target or --fraction")
        clear_shadow(store, name)
        click.echo(f"{name}: shadow traffic off")
        return
    if target is None or fraction is None:
        raise click.UsageError("give --target ALIAS|VERSION and --fraction F, or --off")
    version = set_shadow(store, name, version_ref(target), fraction)
    click.echo(f"{name}: {fraction:g} of jobs also run on {target} (version {version} now)")


def _framework_versions() -> dict[str, str]:
    """scikit-learn's and skl2onnx's versions, for the manifest of a converted model (imported by then)."""
    from inferq.model_store.convert import framework_versions  # noqa: PLC0415

    return framework_versions()
