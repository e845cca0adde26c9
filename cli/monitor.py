"""``inferq monitor``: drift of live inputs and outputs against each version's reference, the agreement
of shadow versions (drift statistics and plots need the monitor extra: scipy, matplotlib), and live
performance from labels."""

from __future__ import annotations

import time
from pathlib import Path

import click
import orjson

from inferq.cli.common import Group, settings, version_ref
from inferq.model_store.stores import open_model_store
from inferq.shared.config.settings import InferqSettings


@click.group(cls=Group)
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
    # scipy (the chi-square p-value) and matplotlib (--plot) are the monitor extra: a missing one fails
    # here, as one line naming the extra (see cli.common.Command).
    from inferq.monitoring.drift_report import drift_report, parse_since, plot_drift, render_drift  # noqa: PLC0415
    from inferq.monitoring.store import open_monitor_store  # noqa: PLC0415

    try:
        since_s = parse_since(since) if since is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    loaded = settings(InferqSettings)
    monitor_store = open_monitor_store(loaded.result_store)
    try:
        report = drift_report(
            open_model_store(loaded.model_store),
            monitor_store,
            model,
            version_ref(version),
            since_s=since_s,
            min_rows=min_rows,
        )
    finally:
        monitor_store.close()
    if plot is not None:
        plot_drift(report, plot)
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

    loaded = settings(InferqSettings)
    monitor_store = open_monitor_store(loaded.result_store)
    try:
        report = shadow_report(open_model_store(loaded.model_store), monitor_store, model)
    finally:
        monitor_store.close()
    click.echo(orjson.dumps(report.to_dict()).decode() if as_json else "\n".join(render_shadow(report)))


@monitor.command("performance")
@click.argument("model")
@click.option("--version", "version", help="Only this version (a number or alias; default: every version).")
@click.option("--since", help="Only predictions stored this long ago or later: 30m, 1h, 7d (default: all).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of text.")
def monitor_performance(model: str, version: str | None, since: str | None, as_json: bool) -> None:
    """Predictions, labeled predictions and how right they were, per version of MODEL: accuracy,
    per-class precision and recall and log loss for a classifier, MAE and RMSE for a regressor; and the
    labels that match no prediction (unmatched). Labels come from inferq labels submit."""
    from inferq.model_store.base import resolve_version  # noqa: PLC0415
    from inferq.monitoring.performance import parse_duration, performance_report, render_performance  # noqa: PLC0415
    from inferq.shared.results.stores import open_result_store  # noqa: PLC0415

    try:
        since_s = time.time() - parse_duration(since) if since is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    loaded = settings(InferqSettings)
    models = open_model_store(loaded.model_store)
    number = resolve_version(models, model, version_ref(version)) if version is not None else None
    store = open_result_store(loaded.result_store)
    try:
        report = performance_report(models, store.labels(), model, number, since_s)
    finally:
        store.close()
    click.echo(orjson.dumps(report.to_dict()).decode() if as_json else "\n".join(render_performance(report)))
