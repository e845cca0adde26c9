"""``inferq models``: publish, list, alias and shadow model versions in the model store."""

from __future__ import annotations

from pathlib import Path

import click
import orjson

from inferq.cli.common import Group, settings, version_ref
from inferq.model_store.base import publish, resolve_version, set_alias
from inferq.model_store.manifest import Manifest
from inferq.model_store.stores import open_model_store
from inferq.shared.config.settings import InferqSettings


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
def models_alias(name: str, alias: str, version: int) -> None:
    """Point ALIAS of model NAME at VERSION (workers pick it up within INFERQ_ALIAS_REFRESH_S)."""
    store = open_model_store(settings(InferqSettings).model_store)
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
