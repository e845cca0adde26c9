"""onnxruntime, and only onnxruntime: load a verified model, stack a batch's checked inputs into one
feed, run one call per batch and split the outputs back per job."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, overload

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from inferq.model_store.manifest import Manifest, TensorSpec
from inferq.model_store.signature import Arrays, Limits, check_inputs, prepare_inputs
from inferq.shared.config.logging import get_logger
from inferq.shared.contract.messages import (
    DATATYPE_OF_NUMPY,
    FLOAT_DATATYPES,
    NUMPY_DTYPES,
    Datatype,
    OutputTensor,
    Tensor,
    non_finite_string,
    trusted,
)
from inferq.shared.errors import ConfigError, InferenceError, JobError

log = get_logger(__name__)

# The input checks live beside the manifest, where the HTTP gateway applies them too.
__all__ = [
    "Arrays",
    "Feed",
    "Limits",
    "LoadedModel",
    "Watchdog",
    "check_inputs",
    "load_model",
    "prepare_inputs",
    "run_batch",
    "run_isolating",
    "stack_inputs",
]


@dataclass(slots=True)
class LoadedModel:
    """A ready onnxruntime session and the manifest it was verified against."""

    manifest: Manifest
    session: ort.InferenceSession
    output_names: list[str]
    output_specs: list[TensorSpec | None] = field(init=False)
    """The manifest's spec of each output, in :attr:`output_names`' order (``None``: not in the manifest)."""

    def __post_init__(self) -> None:
        specs = {spec.name: spec for spec in self.manifest.outputs}
        self.output_specs = [specs.get(name) for name in self.output_names]


CPU_PROVIDER = "CPUExecutionProvider"


def check_providers(providers: tuple[str, ...]) -> None:
    """Refuse, at start, execution providers the installed onnxruntime does not have."""
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing or not providers:
        raise ConfigError(
            f"INFERQ_ORT_PROVIDERS: {', '.join(missing) or 'empty'} not available in this onnxruntime "
            f"(available: {', '.join(available)})"
        )


def load_model(
    manifest: Manifest, data: bytes, intra_op_threads: int = 1, providers: tuple[str, ...] = (CPU_PROVIDER,)
) -> LoadedModel:
    """Create a session from verified bytes (loading from bytes also rules out external data files)."""
    options = ort.SessionOptions()
    # One thread per worker process: scaling is by processes, and threads would fight over the cores.
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(data, sess_options=options, providers=list(providers))
    return LoadedModel(manifest, session, [o.name for o in session.get_outputs()])


class TimedOut(InferenceError):
    """The batch ran longer than the job time limit and was terminated."""


class Unsplittable(InferenceError):
    """An output of a batch cannot be split back per job: its rows do not match the jobs' rows, or it
    is not the fixed size its manifest promises. Each job then runs alone and gets the whole output."""


class Watchdog:
    """Terminates an onnxruntime run that outlives its time limit (one thread, reused for every run).

    Arming a run wakes nobody: the watch thread looks at least once per time limit, and a run armed
    since its last look cannot be due before its next one (a wake-up per batch would cost a thread
    handoff per batch)."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._condition = threading.Condition()
        self._armed: tuple[ort.RunOptions, float] | None = None
        threading.Thread(target=self._watch, name="inferq-watchdog", daemon=True).start()

    def arm(self) -> ort.RunOptions:
        """Options for the next run; the run is terminated if :meth:`disarm` is not called in time."""
        options = ort.RunOptions()
        with self._condition:
            self._armed = (options, time.monotonic() + self.limit_s)
        return options

    def disarm(self) -> None:
        """The run finished."""
        with self._condition:
            self._armed = None

    def _watch(self) -> None:
        with self._condition:
            while True:
                if self._armed is None:
                    self._condition.wait(self.limit_s)
                    continue
                options, deadline = self._armed
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._condition.wait(remaining)
                    continue
                options.terminate = True
                self._armed = None


@dataclass(frozen=True, slots=True)
class Feed(Sequence[Arrays]):
    """Several jobs' inputs as one onnxruntime feed: job ``i`` owns rows ``bounds[i]:bounds[i + 1]``
    of every array. As a sequence, it is each job's own inputs (views, made on demand)."""

    arrays: Arrays
    bounds: list[int]

    @classmethod
    def of(cls, jobs: Sequence[Arrays]) -> Feed:
        """Concatenate jobs' arrays (alike in every axis but the first)."""
        bounds = [0]
        for arrays in jobs:
            bounds.append(bounds[-1] + next(iter(arrays.values())).shape[0])
        if len(jobs) == 1:
            return cls(dict(jobs[0]), bounds)
        return cls({name: np.concatenate([j[name] for j in jobs], axis=0) for name in jobs[0]}, bounds)

    @property
    def counts(self) -> list[int]:
        """Rows per job."""
        return [b - a for a, b in zip(self.bounds, self.bounds[1:], strict=False)]

    def part(self, start: int, stop: int) -> Feed:
        """Jobs ``start`` to ``stop`` (exclusive) as a feed of their own (views, no copy)."""
        low, high = self.bounds[start], self.bounds[stop]
        return Feed({n: a[low:high] for n, a in self.arrays.items()}, [b - low for b in self.bounds[start : stop + 1]])

    def __len__(self) -> int:
        return len(self.bounds) - 1

    @overload
    def __getitem__(self, index: int) -> Arrays: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Arrays]: ...
    def __getitem__(self, index: int | slice) -> Arrays | Sequence[Arrays]:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        low, high = self.bounds[index], self.bounds[index + 1]
        return {n: a[low:high] for n, a in self.arrays.items()}


_NUMBERS = frozenset({bool, int, float})


def stack_inputs(
    jobs: Sequence[Mapping[str, Tensor]], specs: Sequence[TensorSpec]
) -> tuple[list[tuple[list[int], Feed]], dict[int, JobError]]:
    """Checked jobs' tensors as onnxruntime feeds, each with the indices of its jobs, and the jobs whose
    data cannot be converted with their errors.

    Usually one feed for the whole batch, converted with one numpy call per input: per job, numpy's
    conversion costs more than the model runs. Only when the batch is not plainly convertible (a string
    where numbers belong, a number out of range, differing non-batch dimensions) is each job converted
    on its own, so a bad one gets its own error and the others still share feeds.
    """
    feed = _stack_plain(jobs, specs)
    if feed is not None:
        return [(list(range(len(jobs))), feed)], {}
    errors: dict[int, JobError] = {}
    groups: dict[tuple[tuple[int, ...], ...], tuple[list[int], list[Arrays]]] = {}
    for index, tensors in enumerate(jobs):
        try:
            arrays = {spec.name: tensors[spec.name].to_numpy() for spec in specs}
        except JobError as error:
            errors[index] = error
            continue
        indices, members = groups.setdefault(tuple(a.shape[1:] for a in arrays.values()), ([], []))
        indices.append(index)
        members.append(arrays)
    return [(indices, Feed.of(members)) for indices, members in groups.values()], errors


def _stack_plain(jobs: Sequence[Mapping[str, Tensor]], specs: Sequence[TensorSpec]) -> Feed | None:
    """One feed for every job, or ``None`` if any job's data needs a closer look."""
    bounds = [0]
    for job in jobs:
        bounds.append(bounds[-1] + job[specs[0].name].shape[0])
    arrays: Arrays = {}
    for spec in specs:
        column = [job[spec.name] for job in jobs]
        tail = column[0].shape[1:]
        if any(t.shape[1:] != tail for t in column):
            return None
        flat = list(chain.from_iterable(t.data for t in column))
        kinds = set(map(type, flat))
        if spec.datatype is Datatype.BYTES:
            if not kinds <= {str}:
                return None
            array = np.array(flat, dtype=np.object_)
        elif not kinds <= _NUMBERS:
            return None
        else:
            try:
                with np.errstate(all="raise"):
                    array = np.asarray(flat, dtype=NUMPY_DTYPES[spec.datatype])
            except (OverflowError, ValueError, FloatingPointError):
                return None
        arrays[spec.name] = array.reshape(bounds[-1], *tail)
    return Feed(arrays, bounds)


def run_batch(model: LoadedModel, feed: Feed, watchdog: Watchdog | None = None) -> list[list[OutputTensor]]:
    """One onnxruntime call for every job of ``feed``, outputs split back per job."""
    options = watchdog.arm() if watchdog is not None else None
    try:
        outputs = model.session.run(model.output_names, feed.arrays, options)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
        if watchdog is not None and options is not None and options.terminate:
            raise TimedOut(f"inference exceeded the job time limit of {watchdog.limit_s:g}s") from None
        raise InferenceError(f"onnxruntime failed: {exc}") from None
    finally:
        if watchdog is not None:
            watchdog.disarm()
    counts = feed.counts
    per_job: list[list[OutputTensor]] = [[] for _ in counts]
    for name, spec, output in zip(model.output_names, model.output_specs, outputs, strict=True):
        for slot, tensor in zip(per_job, _split(name, np.asarray(output), counts, spec), strict=True):
            slot.append(tensor)
    return per_job


def has_batch_axis(spec: TensorSpec | None) -> bool:
    """True when an output has a row per input row: its leading dimension is dynamic (``None``, or
    negative) in the manifest. An output the manifest does not describe is taken to have one (it is then
    split by rows, or each job runs alone: never copied to jobs it may not belong to)."""
    if spec is None:
        return True
    return bool(spec.shape) and (spec.shape[0] is None or spec.shape[0] < 0)


def _fixed_size(array: npt.NDArray[Any], spec: TensorSpec) -> bool:
    """``array`` has exactly the shape ``spec`` promises (its dynamic dimensions aside)."""
    return array.ndim == len(spec.shape) and all(
        want is None or want < 0 or got == want for got, want in zip(array.shape, spec.shape, strict=True)
    )


def _output(name: str, array: npt.NDArray[Any]) -> OutputTensor:
    tensor = Tensor.from_numpy(name, array)
    data = tensor.data
    if tensor.datatype in FLOAT_DATATYPES and not np.isfinite(array).all():
        data = [x if math.isfinite(x) else non_finite_string(x) for x in data]  # type: ignore[arg-type]
    return trusted(OutputTensor, name=name, shape=tensor.shape, datatype=tensor.datatype, data=data)


def _split(name: str, array: npt.NDArray[Any], counts: list[int], spec: TensorSpec | None) -> list[OutputTensor]:
    """One output tensor per job, as the manifest's ``spec`` of the output says: with a batch axis, rows
    split by ``counts``; without one (a fixed size, such as a list of class labels), the same whole
    output for every job. Raises :class:`Unsplittable` for a batch of several jobs whose output is
    neither. NaN and ±Inf become the wire strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``."""
    total = sum(counts)
    batched = has_batch_axis(spec)
    rows_match = bool(array.ndim) and array.shape[0] == total
    if len(counts) == 1 and not (batched and rows_match):
        return [_output(name, array)]  # one job: whatever came back is its own
    if not batched:
        assert spec is not None
        if not _fixed_size(array, spec):
            raise Unsplittable(f"output {name!r} has shape {list(array.shape)}, not the {spec.shape} of its manifest")
        return [_output(name, array)] * len(counts)
    if not rows_match:
        raise Unsplittable(f"output {name!r} has shape {list(array.shape)}, not a row for each of {total} input rows")
    datatype = DATATYPE_OF_NUMPY.get(array.dtype)
    if datatype is None or array.size == 0:  # strings and empty outputs: the general path
        return [_output(name, part) for part in np.split(array, np.cumsum(counts)[:-1])]
    # One conversion to Python numbers for the whole batch, then plain list slicing per job: much
    # cheaper than an array split and a conversion per job.
    rows = array.reshape(total, -1).tolist()
    if datatype in FLOAT_DATATYPES and not np.isfinite(array).all():
        rows = [[x if math.isfinite(x) else non_finite_string(x) for x in row] for row in rows]
    tail = list(array.shape[1:])
    tensors = []
    start = 0
    for count in counts:
        data = rows[start] if count == 1 else [x for row in rows[start : start + count] for x in row]
        tensors.append(trusted(OutputTensor, name=name, shape=[count, *tail], datatype=datatype, data=data))
        start += count
    return tensors


TIMED_OUT_RUNS_PER_BATCH = 3
"""Runs the watchdog may terminate while one batch is isolated: the batch's own and two jobs alone. A
batch that hits the time limit therefore holds its deliveries for at most this many time limits plus
its own work, run job by job; past it, the jobs not yet run get the time-out too (a batch with that
many slow jobs wants a longer ``INFERQ_JOB_TIMEOUT_S`` or smaller batches)."""

JobOutcome = list[OutputTensor] | JobError
"""A job's outputs, or the error that is its result."""


def run_isolating(model: LoadedModel, feed: Feed, watchdog: Watchdog | None = None) -> list[JobOutcome]:
    """Run ``feed``'s jobs together; if the batch fails, find the jobs that fail on their own so that
    only they get an error. An error bisects the batch. A batch that ran out of time, or whose outputs
    cannot be split per job, runs each job alone instead: bisecting it would spend a whole time limit at
    every level (``ceil(log2(n)) + 1`` limits for one slow job among ``n``), where alone each slow job
    spends one, and :data:`TIMED_OUT_RUNS_PER_BATCH` bounds the total."""
    return _Isolation(model, watchdog).run(feed)


@dataclass(slots=True)
class _Isolation:
    """One batch's isolation, and what is left of its budget of terminated runs."""

    model: LoadedModel
    watchdog: Watchdog | None
    timeouts_left: int = TIMED_OUT_RUNS_PER_BATCH

    def run(self, feed: Feed) -> list[JobOutcome]:
        try:
            return list(run_batch(self.model, feed, self.watchdog))
        except TimedOut as error:
            self.timeouts_left -= 1
            return self._each_alone(feed, error)
        except Unsplittable as error:
            return self._each_alone(feed, error)
        except InferenceError as error:
            if len(feed) == 1:
                return [error]
        middle = len(feed) // 2
        return self.run(feed.part(0, middle)) + self.run(feed.part(middle, len(feed)))

    def _each_alone(self, feed: Feed, error: InferenceError) -> list[JobOutcome]:
        if len(feed) == 1:
            return [error]
        log.warning("batch_run_job_by_job", model=self.model.manifest.name, jobs=len(feed), reason=str(error))
        outcomes: list[JobOutcome] = []
        for index in range(len(feed)):
            if self.timeouts_left > 0:
                outcomes.extend(self.run(feed.part(index, index + 1)))
            else:
                outcomes.append(self._not_run())
        return outcomes

    def _not_run(self) -> TimedOut:
        limit = f" of {self.watchdog.limit_s:g}s" if self.watchdog is not None else ""
        return TimedOut(
            f"not run: {TIMED_OUT_RUNS_PER_BATCH} runs of its batch exceeded the job time limit{limit} "
            "(raise INFERQ_JOB_TIMEOUT_S or lower INFERQ_MAX_BATCH_ROWS)"
        )
