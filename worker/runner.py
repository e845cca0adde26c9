"""onnxruntime, and only onnxruntime: load a verified model, stack a batch's checked inputs into one
feed, run one call per batch and split the outputs back per job."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, overload

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from inferq.model_store.manifest import Manifest, TensorSpec
from inferq.model_store.signature import Arrays, Limits, check_inputs, prepare_inputs
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
    for name, output in zip(model.output_names, outputs, strict=True):
        for slot, tensor in zip(per_job, _split(name, np.asarray(output), counts), strict=True):
            slot.append(tensor)
    return per_job


def _output(name: str, array: npt.NDArray[Any]) -> OutputTensor:
    tensor = Tensor.from_numpy(name, array)
    data = tensor.data
    if tensor.datatype in FLOAT_DATATYPES and not np.isfinite(array).all():
        data = [x if math.isfinite(x) else non_finite_string(x) for x in data]  # type: ignore[arg-type]
    return trusted(OutputTensor, name=name, shape=tensor.shape, datatype=tensor.datatype, data=data)


def _split(name: str, array: npt.NDArray[Any], counts: list[int]) -> list[OutputTensor]:
    """One output tensor per job: rows split by ``counts`` (an output without a row axis goes to all).
    NaN and ±Inf become the wire strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``."""
    total = sum(counts)
    if not (array.ndim and array.shape[0] == total):
        return [_output(name, array)] * len(counts)
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


def run_isolating(
    model: LoadedModel, feed: Feed, watchdog: Watchdog | None = None
) -> list[list[OutputTensor] | JobError]:
    """Run ``feed``'s jobs together; if the batch fails, bisect so only the offending jobs get the error.
    A batch that ran out of time is not re-run: every job in it gets the same error."""
    try:
        return list(run_batch(model, feed, watchdog))
    except TimedOut as error:
        return [error] * len(feed)
    except InferenceError as error:
        if len(feed) == 1:
            return [error]
    middle = len(feed) // 2
    return run_isolating(model, feed.part(0, middle), watchdog) + run_isolating(
        model, feed.part(middle, len(feed)), watchdog
    )
