"""The model store interface and the logic every implementation shares: names, resolution, publishing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from inferq.model_store.guard import GUARDS_FILE, GuardRecord, new_guard_id, replace_guard
from inferq.model_store.history import HISTORY_FILE, AliasMove, GuardSpec, actor, now, record_move
from inferq.model_store.manifest import Manifest, build_manifest
from inferq.monitoring.reference import Reference, ReferenceTable, build_reference, build_table_reference
from inferq.shared.contract.messages import LATEST, VersionRef, is_valid_alias, is_valid_name
from inferq.shared.errors import InvalidName, InvalidPayload, NotGuardable, UnknownModel, UnknownVersion, VersionExists
from inferq.shared.tables.table import Column, Table

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
ALIASES_FILE = "aliases.json"
SHADOW_FILE = "shadow.json"
MAX_PUBLISH_ATTEMPTS = 20
DOCUMENTS = frozenset({GUARDS_FILE, HISTORY_FILE})


class ModelStore(Protocol):
    """Immutable model versions and movable aliases, laid out as ``<model>/<N>/{model.onnx,manifest.json}``
    and ``<model>/aliases.json``."""

    def describe(self) -> str:
        """Where the store lives, for logs and messages."""

    def list_models(self) -> list[str]:
        """Names of models with at least one published version."""

    def list_versions(self, name: str) -> list[int]:
        """Published versions of ``name`` (those with a manifest), ascending."""

    def read_manifest(self, name: str, version: int) -> Manifest:
        """The manifest of a version; raises :class:`UnknownModel` / :class:`UnknownVersion`."""

    def read_model(self, name: str, version: int, *, max_bytes: int | None = None) -> bytes:
        """The ONNX bytes of a version; raises :class:`UnknownVersion` when absent and
        :class:`ModelLoadError` (without reading it) when it is larger than ``max_bytes``."""

    def read_aliases(self, name: str) -> dict[str, int]:
        """Alias name → version for ``name``."""

    def update_aliases(self, name: str, change: Callable[[dict[str, int]], dict[str, int]]) -> None:
        """Replace the aliases of ``name`` with ``change(current)``, atomically: two concurrent updates
        never lose one another (``change`` may run more than once)."""

    def put_version(self, manifest: Manifest, model_bytes: bytes) -> None:
        """Publish a version atomically; raises :class:`VersionExists` if the number is taken."""

    def read_shadow(self, name: str) -> bytes | None:
        """The shadow-traffic setting of ``name`` as stored (``<model>/shadow.json``), or ``None``."""

    def write_shadow(self, name: str, data: bytes | None) -> None:
        """Replace the shadow-traffic setting of ``name`` (atomically); ``None`` removes it."""

    def read_document(self, name: str, document: str) -> bytes | None:
        """The small JSON document ``<model>/<document>`` (guards, history) as stored, or ``None``."""

    def update_document(self, name: str, document: str, change: Callable[[bytes | None], bytes | None]) -> None:
        """Replace ``<model>/<document>`` with ``change(current)`` by compare-and-swap: written only over the
        exact content ``change`` saw, so two concurrent updates never lose one another (``change`` may run
        more than once, and returns ``None`` to leave the document as it is)."""


def check_name(name: str) -> str:
    """``name`` if it can name a model, else :class:`InvalidName`."""
    if not is_valid_name(name):
        raise InvalidName(
            f"invalid model name {name!r}: use letters, digits, '.', '_' or '-', starting with a letter or "
            "digit, no '..', at most 128 characters"
        )
    return name


def check_document(document: str) -> str:
    """``document`` if it names one of the small JSON documents a model keeps (guards, history), else
    :class:`InvalidName` (it is joined to a path or key)."""
    if document not in DOCUMENTS:
        raise InvalidName(f"no model document named {document!r}")
    return document


def check_alias(alias: str) -> str:
    """``alias`` if it can name an alias, else :class:`InvalidName`."""
    if not is_valid_alias(alias):
        raise InvalidName(
            f"invalid alias {alias!r}: start with a letter, then letters, digits, '.', '_' or '-'; 'latest' is reserved"
        )
    return alias


def resolve_version(store: ModelStore, name: str, ref: VersionRef) -> int:
    """The concrete version ``ref`` names for model ``name`` right now."""
    versions = store.list_versions(name)
    if not versions:
        raise UnknownModel(f"no model named {name!r} in {store.describe()}")
    if isinstance(ref, int):
        if ref not in versions:
            raise UnknownVersion(f"model {name!r} has no version {ref} (published: {_span(versions)})")
        return ref
    if ref == LATEST:
        return versions[-1]
    aliases = store.read_aliases(name)
    if ref not in aliases:
        known = ", ".join(sorted(aliases)) or "none"
        raise UnknownVersion(f"model {name!r} has no alias {ref!r} (aliases: {known})")
    return aliases[ref]


def read_table(store: ModelStore, name: str, ref: VersionRef) -> Table:
    """How rows become the inputs of the version ``ref`` names now (see :class:`inferq.shared.tables.table.Table`)."""
    return store.read_manifest(name, resolve_version(store, name, ref)).table()


def _span(versions: list[int]) -> str:
    return ", ".join(str(v) for v in versions[-10:])


def publish(
    store: ModelStore,
    name: str,
    model_bytes: bytes,
    *,
    version: int | None = None,
    alias: str | None = None,
    source: str = "onnx",
    framework: dict[str, str] | None = None,
    columns: list[Column] | None = None,
    reference: tuple[Any, list[str]] | ReferenceTable | None = None,
) -> Manifest:
    """Publish ``model_bytes`` as a new immutable version (the next number unless ``version`` is given);
    ``columns`` names the table the model reads, when it reads named columns; ``reference`` (rows as a
    2-D array and feature names, or a :class:`ReferenceTable` by column name) becomes the manifest's
    reference distribution."""
    check_name(name)
    if alias is not None:
        check_alias(alias)
    first = version if version is not None else max(store.list_versions(name), default=0) + 1
    # The reference is computed once, before any number is taken: it depends only on the model.
    binned = None
    if reference is not None:
        draft = build_manifest(name, first, model_bytes, source, framework or {}, columns)
        binned = _reference(draft, model_bytes, reference)
    for number in range(first, first + MAX_PUBLISH_ATTEMPTS):
        manifest = build_manifest(name, number, model_bytes, source, framework or {}, columns)
        if binned is not None:
            manifest = manifest.model_copy(update={"reference": binned})
        try:
            store.put_version(manifest, model_bytes)
            break
        except VersionExists:
            if version is not None:
                raise
            # Another publisher took that number first: take the next one.
    else:
        raise VersionExists(f"could not find a free version number for {name!r}; retry")
    if alias is not None:
        set_alias(store, name, alias, manifest.version, reason=f"published version {manifest.version}")
    return manifest


def set_alias(
    store: ModelStore,
    name: str,
    alias: str,
    version: int,
    *,
    guard: GuardSpec | None = None,
    by: str | None = None,
    reason: str = "",
) -> AliasMove:
    """Point ``alias`` of model ``name`` at an existing ``version`` and record the move in the history.
    With ``guard``, workers watch the jobs that resolve the alias to ``version`` and move it back by
    themselves when too many fail (:mod:`inferq.model_store.guard`); any move replaces the alias's guard."""
    check_name(name)
    check_alias(alias)
    resolve_version(store, name, version)  # the version must exist
    if guard is not None:
        _check_guardable(store, name, alias, version)
    before: list[int | None] = []

    def move(aliases: dict[str, int]) -> dict[str, int]:
        before[:] = [aliases.get(alias)]
        return {**aliases, alias: version}

    store.update_aliases(name, move)
    entry = AliasMove(
        id=new_guard_id(),
        at=now(),
        alias=alias,
        from_version=before[0],
        to_version=version,
        by=by or actor(),
        reason=reason,
        guard=guard,
    )
    record = None
    if guard is not None and entry.from_version is not None and entry.from_version != version:
        record = GuardRecord(
            id=entry.id,
            alias=alias,
            from_version=entry.from_version,
            to_version=version,
            spec=guard,
            by=entry.by,
            started_at=entry.at,
        )
    # NOTE: the guard is written after the alias moved: jobs resolved in between are not counted, which
    # only lengthens the window a little; written before, it could outlive a move that never happened.
    replace_guard(store, name, alias, record)
    record_move(store, name, entry)
    return entry


def _check_guardable(store: ModelStore, name: str, alias: str, version: int) -> None:
    """A guard needs a version to return to: the alias must exist and point elsewhere."""
    current = store.read_aliases(name).get(alias)
    if current is None:
        raise NotGuardable(f"alias {alias!r} of {name!r} does not exist yet: a guard needs a version to return to")
    if current == version:
        raise NotGuardable(f"alias {alias!r} of {name!r} already points at version {version}: nothing to guard")


def _reference(manifest: Manifest, model_bytes: bytes, reference: tuple[Any, list[str]] | ReferenceTable) -> Reference:
    if isinstance(reference, ReferenceTable):
        if [c.name for c in reference.columns] != [c.name for c in manifest.columns or []]:
            raise InvalidPayload(f"--reference: model {manifest.name!r} does not read the reference's columns")
        return build_table_reference(model_bytes, manifest.inputs, reference)
    data, names = reference
    if len(manifest.inputs) != 1 or len(manifest.inputs[0].shape) != 2:
        raise InvalidPayload(f"--reference: model {manifest.name!r} does not take one 2-D input")
    spec = manifest.inputs[0]
    width = spec.shape[1]
    if width is not None and width != data.shape[1]:
        raise InvalidPayload(f"--reference: the model takes {width} features per row, the data has {data.shape[1]}")
    return build_reference(model_bytes, spec.name, spec.datatype, data, names)
