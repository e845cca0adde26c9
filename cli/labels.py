"""``inferq labels``: ground truth for predictions, stored beside the results and joined by
``inferq monitor performance``."""

from __future__ import annotations

from pathlib import Path

import click

from inferq.cli.common import Group, settings
from inferq.model_store.base import resolve_version
from inferq.model_store.stores import open_model_store
from inferq.monitoring.label_file import LabelFileError, read_labels
from inferq.monitoring.performance import prediction_rule
from inferq.shared.config.settings import InferqSettings
from inferq.shared.contract.messages import LATEST
from inferq.shared.results.labels import LabelValue
from inferq.shared.results.stores import open_result_store


@click.group(cls=Group)
def labels() -> None:
    """Ground truth for predictions, joined by id (see inferq monitor performance)."""


@labels.command("submit")
@click.argument("path", metavar="FILE", type=click.Path(path_type=Path))
@click.option("--model", required=True, help="The model the labels are for.")
@click.option("--id-column", default="id", show_default=True, help="Column holding the prediction's id.")
@click.option("--label-column", default="label", show_default=True, help="Column holding the true value.")
def labels_submit(path: Path, model: str, id_column: str, label_column: str) -> None:
    """Store the labels of FILE (.csv with a header, .jsonl or .parquet) for MODEL.

    An id is the one you know for a prediction: the job id given to submit, the HTTP API or the
    producer (J/i for row i of a job of many rows), or the id column's value of a backfill row. The first
    label of an id wins; a label may come before or after its prediction. The whole file is checked first:
    a missing column or an id with two different labels stores nothing."""
    loaded = settings(InferqSettings)
    models = open_model_store(loaded.model_store)
    latest = models.read_manifest(model, resolve_version(models, model, LATEST))  # the model must exist
    given = read_labels(path, id_column, label_column)
    if not prediction_rule(latest).classifier:
        _check_numbers(path, given, model)
    store = open_result_store(loaded.result_store)
    try:
        new = store.labels().put_labels(model, given)
    finally:
        store.close()
    kept = len(given) - new
    click.echo(f"stored {new} labels for {model}" + (f", {kept} ids already had one (kept)" if kept else ""))


def _check_numbers(path: Path, given: list[tuple[str, LabelValue]], model: str) -> None:
    """A regressor's labels are numbers: a text label would never count, so it is refused here."""
    for label_id, value in given:
        if isinstance(value, bool):
            raise LabelFileError(f"{path}: id {label_id!r}: {model} predicts numbers, not {value!r}")
        try:
            float(value)
        except ValueError:
            raise LabelFileError(f"{path}: id {label_id!r}: {model} predicts numbers, not {value!r}") from None
