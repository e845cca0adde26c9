"""Shadow traffic in the worker: the next version runs on a sample of real jobs, beside the one that answers.

A job is sampled by a hash of its id (:func:`inferq.monitoring.shadow_setting.sampled`). The processing thread only
stages a sampled job's inputs and outputs, or the error the answering version gave it (a failed job is
shadowed too: its pair counts as an error of that version); once the unit's results are stored and
their publishes issued, the I/O thread releases them to the shadow thread, which runs the shadow version in a batch
of its own and stores the pairs in the store's shadow area. Nothing here touches the job's result, the
results queue or ``reply_to``, and any failure of the shadow model becomes the pair's error. While the
jobs queue is deeper than ``INFERQ_SHADOW_MAX_BACKLOG`` sampled jobs are skipped, and counted.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pika
import pika.exceptions

from inferq.model_store.manifest import Manifest
from inferq.model_store.registry import Registry
from inferq.monitoring.shadow_setting import ShadowSetting, read_shadow, sampled
from inferq.monitoring.store import MonitorStore, ShadowPair, WindowCounts
from inferq.shared.broker.connection import open_blocking
from inferq.shared.broker.topology import jobs_queue
from inferq.shared.config.logging import get_logger
from inferq.shared.config.settings import WorkerSettings
from inferq.shared.contract.messages import NUMPY_DTYPES, Job, OutputTensor
from inferq.shared.errors import InferqError, JobError
from inferq.worker.runner import Feed, LoadedModel, run_isolating

log = get_logger(__name__)

Arrays = dict[str, npt.NDArray[Any]]
DEPTH_EVERY_S = 1.0
"""How often the shadow thread asks the broker how deep the jobs queue is."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """A sampled job: what the shadow version needs, and what to pair its answer with (the answering
    version's outputs, or its error when it failed the job)."""

    job_id: str
    model: str
    version: int
    target: int | str
    arrays: Arrays
    outputs: list[OutputTensor]
    inference_ms: float | None
    error: str | None = None


def _misfit(arrays: Arrays, manifest: Manifest) -> str | None:
    """Why ``arrays`` cannot feed ``manifest``'s inputs (``None`` when they can): the shadow version may
    take other inputs than the version that answered."""
    specs = {spec.name: spec for spec in manifest.inputs}
    if set(arrays) != set(specs):
        return f"the shadow version takes inputs {sorted(specs)}, the job has {sorted(arrays)}"
    for name, array in arrays.items():
        spec = specs[name]
        wanted = np.dtype(NUMPY_DTYPES[spec.datatype])
        fixed = all(w is None or g == w for g, w in zip(array.shape[1:], spec.shape[1:], strict=False))
        if array.dtype != wanted or array.ndim != len(spec.shape) or not fixed:
            shape = ["N" if d is None else d for d in spec.shape]
            return f"input {name!r} must be {spec.datatype} of shape {shape} for the shadow version"
    return None


def _raw_arrays(job: Job) -> Arrays:
    """A refused job's tensors as they came (empty when they are not even readable)."""
    try:
        return {t.name: t.to_numpy() for t in job.inputs}
    except JobError:
        return {}


def _tensor(t: OutputTensor) -> dict[str, Any]:
    return {"name": t.name, "shape": t.shape, "datatype": str(t.datatype), "data": t.data}


class Shadow:
    """Samples jobs of models with a shadow setting and runs their shadow version on a thread of its own."""

    def __init__(self, settings: WorkerSettings, registry: Registry[LoadedModel], store: MonitorStore, worker: str):
        self.settings = settings
        self.registry = registry
        self.store = store
        self.worker = worker
        self.backlog = 0  # jobs waiting, as last seen by the shadow thread
        self._settings_seen: dict[str, tuple[ShadowSetting | None, float]] = {}
        self._refreshing: set[str] = set()
        self._staged: list[Candidate] = []
        self._lock = threading.Lock()
        self._work: queue.SimpleQueue[list[Candidate] | str | None] = queue.SimpleQueue()
        self._skipped: Counter[tuple[str, int]] = Counter()
        self._unwritten: list[ShadowPair] = []
        self._depth_at = 0.0
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._thread: threading.Thread | None = None
        self.pairs_written = 0

    # -- the processing thread: one call per batch ------------------------------------------------

    def offer(
        self, manifest: Manifest, job_ids: Sequence[str], inputs: Sequence[Arrays], results: Sequence[object], ms: float
    ) -> None:
        """Stage the sampled jobs of a batch that ran (``results[i]``: job i's outputs, or its error)."""
        setting = self._setting(manifest.name)
        if setting is None:
            return
        chosen = [
            Candidate(job_id, manifest.name, manifest.version, setting.target, arrays, [], ms, str(result))
            if isinstance(result, JobError)
            else Candidate(job_id, manifest.name, manifest.version, setting.target, arrays, result, ms)  # type: ignore[arg-type]
            for job_id, arrays, result in zip(job_ids, inputs, results, strict=True)
            if sampled(job_id, setting.fraction)
        ]
        self._stage(manifest, chosen)

    def offer_refused(self, manifest: Manifest, refused: Sequence[tuple[Job, JobError]]) -> None:
        """Stage the sampled jobs that the answering version refused before running them (their inputs do
        not fit its signature): the shadow version runs on their tensors as sent."""
        setting = self._setting(manifest.name)
        if setting is None:
            return
        chosen = [
            Candidate(job.id, manifest.name, manifest.version, setting.target, _raw_arrays(job), [], None, str(error))
            for job, error in refused
            if sampled(job.id, setting.fraction)
        ]
        self._stage(manifest, chosen)

    def _stage(self, manifest: Manifest, chosen: list[Candidate]) -> None:
        if not chosen:
            return
        with self._lock:
            skip = self.backlog > self.settings.shadow_max_backlog
            if skip:
                self._skipped[(manifest.name, manifest.version)] += len(chosen)
            else:
                self._staged.extend(chosen)
        if skip and time.monotonic() - self._depth_at >= DEPTH_EVERY_S:
            self._submit([])  # wakes the shadow thread to look at the depth again

    def _setting(self, model: str) -> ShadowSetting | None:
        """The model's shadow setting as last read. NOTE: only a model's first batch reads the store on
        this thread (right after its version was fetched, so the store just answered); later reads, every
        ``INFERQ_ALIAS_REFRESH_S``, happen on the shadow thread, so a slow store never stalls processing."""
        seen = self._settings_seen.get(model)
        if seen is None:
            return self._read_setting(model)
        if time.monotonic() - seen[1] >= self.settings.alias_refresh_s and model not in self._refreshing:
            self._refreshing.add(model)
            self._submit(model)
        return seen[0]

    def _read_setting(self, model: str) -> ShadowSetting | None:
        seen = self._settings_seen.get(model)
        try:
            setting = read_shadow(self.registry.store, model)
        except (InferqError, OSError) as exc:
            log.warning("shadow_setting_unreadable", model=model, error=str(exc))
            setting = seen[0] if seen is not None else None
        self._settings_seen[model] = (setting, time.monotonic())
        return setting

    # -- the I/O thread: after the unit's results were stored and published -----------------------

    def release(self) -> None:
        """Hand the staged jobs (their results are stored and published) to the shadow thread."""
        with self._lock:
            staged, self._staged = self._staged, []
        if staged:
            self._submit(staged)

    def _submit(self, candidates: list[Candidate] | str) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="inferq-shadow", daemon=True)
                self._thread.start()
        self._work.put(candidates)

    def discard(self) -> None:
        """The unit was not completed (its jobs return to the queue): its staged jobs are not shadowed."""
        with self._lock:
            self._staged = []

    # -- the shadow thread ------------------------------------------------------------------------

    def _serve(self) -> None:
        while (candidates := self._work.get()) is not None:
            if isinstance(candidates, str):  # a model whose setting is due to be read again
                self._read_setting(candidates)
                self._refreshing.discard(candidates)
                continue
            try:
                self._shadow(candidates)
            except Exception as exc:  # a bug here must never stop the worker; the pairs are lost, and logged
                log.error("shadow_failed", jobs=len(candidates), error=f"{type(exc).__name__}: {exc}")
            self._watch_depth()

    def _shadow(self, candidates: list[Candidate]) -> None:
        if not candidates:
            return
        groups: dict[tuple[str, int | str], list[Candidate]] = {}
        for candidate in candidates:
            groups.setdefault((candidate.model, candidate.target), []).append(candidate)
        pairs: list[ShadowPair] = []
        for (model, target), group in groups.items():
            pairs.extend(self._run(model, target, group))
        self._store(pairs)

    def _run(self, model: str, target: int | str, group: list[Candidate]) -> list[ShadowPair]:
        try:
            version = self.registry.resolve(model, target)
            _, loaded = self.registry.get(model, version)
        except (InferqError, OSError) as exc:
            log.warning("shadow_model_unavailable", model=model, target=str(target), error=str(exc))
            return [self._pair(c, -1, None, None, str(exc)) for c in group]
        group = [c for c in group if c.version != version]  # the target answered these itself: nothing to compare
        misfits = [(c, _misfit(c.arrays, loaded.manifest)) for c in group]
        pairs = [self._pair(c, version, None, None, why) for c, why in misfits if why is not None]
        group = [c for c, why in misfits if why is None]
        if not group:
            return pairs
        started = time.perf_counter()
        results = run_isolating(loaded, Feed.of([c.arrays for c in group]))
        ms = (time.perf_counter() - started) * 1000
        return pairs + [
            self._pair(c, version, None, None, str(r))
            if isinstance(r, JobError)
            else self._pair(c, version, [_tensor(t) for t in r], ms, None)
            for c, r in zip(group, results, strict=True)
        ]

    def _pair(
        self,
        candidate: Candidate,
        version: int,
        outputs: list[dict[str, Any]] | None,
        ms: float | None,
        error: str | None,
    ) -> ShadowPair:
        return ShadowPair(
            job_id=candidate.job_id,
            model=candidate.model,
            version=candidate.version,
            shadow_version=version,
            outputs=[_tensor(t) for t in candidate.outputs],
            shadow_outputs=outputs,
            inference_ms=None if candidate.inference_ms is None else round(candidate.inference_ms, 3),
            shadow_inference_ms=None if ms is None else round(ms, 3),
            shadow_error=error,
            worker=self.worker,
            error=candidate.error,
        )

    def _store(self, pairs: list[ShadowPair]) -> bool:
        """Store ``pairs`` and any the store refused before; True when none is left unwritten."""
        pending = [*self._unwritten, *pairs]
        if not pending:
            return True
        try:
            self.store.put_pairs(pending)
        except OSError as exc:
            self._unwritten = pending[-100_000:]  # NOTE: bounded; what is dropped was logged here
            log.warning("shadow_pairs_not_written", pairs=len(pending), error=str(exc))
            return False
        self._unwritten = []
        self.pairs_written += len(pending)
        log.info("shadow_pairs_written", pairs=len(pending))
        return True

    def _watch_depth(self) -> None:
        """How deep the jobs queue is, at most every second, on a connection of this thread's own."""
        if time.monotonic() - self._depth_at < DEPTH_EVERY_S:
            return
        self._depth_at = time.monotonic()
        spec = jobs_queue(self.settings)
        try:
            if self._connection is None or not self._connection.is_open:
                self._connection = open_blocking(self.settings, f"inferq-shadow {self.worker}")
                self._channel = self._connection.channel()
            frame = self._channel.queue_declare(spec.name, passive=True, durable=True)
            self.backlog = int(frame.method.message_count)
        except (pika.exceptions.AMQPError, InferqError, OSError) as exc:
            log.warning("shadow_backlog_unknown", error=str(exc))
            if self._connection is not None and self._connection.is_open:
                self._connection.close()
            self._connection = None

    # -- stop and the end of a drain --------------------------------------------------------------

    def finish(self, timeout_s: float) -> bool:
        """Run what is released, store every pair and the skipped counts; True when all of it is stored."""
        self.release()
        if self._thread is not None:
            self._work.put(None)
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("shadow_unfinished", timeout_s=timeout_s)
                return False
        stored = self._store([])
        with self._lock:
            skipped, self._skipped = self._skipped, Counter()
        now = int(time.time())
        for (model, version), count in skipped.items():
            try:
                self.store.put_window(WindowCounts(model, version, now, 0, self.worker, shadow_skipped=count))
            except OSError as exc:
                log.warning("shadow_skips_not_written", model=model, skipped=count, error=str(exc))
                stored = False
        if self._connection is not None and self._connection.is_open:
            self._connection.close()
        return stored
