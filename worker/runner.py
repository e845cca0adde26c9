"""onnxruntime, and only onnxruntime: load a verified model, check job inputs against its signature,
run one call per batch and split the outputs back per job."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from model_store.manifest import Manifest, TensorSpec
from shared.errors import ConfigError, InferenceError, InputMismatch, JobError, TooLarge
from shared.messages import DATATYPE_OF_NUMPY, FLOAT_DATATYPES, Job, OutputTensor, Tensor, non_finite_string, trusted

Arrays = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-job bounds enforced before anything runs."""

    max_rows_per_job: int
    max_elements_per_tensor: int


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


def prepare_inputs(job: Job, manifest: Manifest, limits: Limits) -> Arrays:
    """The job's tensors as arrays, checked against the model's signature; raises a :class:`JobError`."""
    given = {t.name: t for t in job.inputs}
    expected = {spec.name for spec in manifest.inputs}
    if set(given) != expected:
        raise InputMismatch(
            f"model {manifest.name!r} v{manifest.version} takes inputs {sorted(expected)}, job gave {sorted(given)}"
        )
    arrays = {spec.name: _check_tensor(given[spec.name], spec, limits) for spec in manifest.inputs}
    rows = {a.shape[0] for a in arrays.values()}
    if len(rows) > 1:
        raise InputMismatch(f"inputs disagree on the number of rows: {sorted(rows)}")
    if next(iter(rows)) > limits.max_rows_per_job:
        raise TooLarge(f"job has {next(iter(rows))} rows, above the limit of {limits.max_rows_per_job}")
    return arrays


def _check_tensor(tensor: Tensor, spec: TensorSpec, limits: Limits) -> npt.NDArray[Any]:
    elements = math.prod(tensor.shape)
    if elements > limits.max_elements_per_tensor:
        raise TooLarge(
            f"input {tensor.name!r} has {elements} elements, above the limit of {limits.max_elements_per_tensor}"
        )
    if tensor.datatype is not spec.datatype:
        raise InputMismatch(f"input {tensor.name!r} must be {spec.datatype}, job sent {tensor.datatype}")
    if len(tensor.shape) != len(spec.shape) or any(
        want is not None and got != want for got, want in zip(tensor.shape[1:], spec.shape[1:], strict=True)
    ):
        wanted = ["N" if d is None else d for d in spec.shape]
        raise InputMismatch(f"input {tensor.name!r} must have shape {wanted}, job sent {tensor.shape}")
    return tensor.to_numpy()


class TimedOut(InferenceError):
    """The batch ran longer than the job time limit and was terminated."""


class Watchdog:
    """Terminates an onnxruntime run that outlives its time limit (one thread, reused for every run)."""

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
            self._condition.notify()
        return options

    def disarm(self) -> None:
        """The run finished."""
        with self._condition:
            self._armed = None

    def _watch(self) -> None:
        with self._condition:
            while True:
                if self._armed is None:
                    self._condition.wait()
                    continue
                options, deadline = self._armed
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._condition.wait(remaining)
                    continue
                options.terminate = True
                self._armed = None


def run_batch(model: LoadedModel, jobs: list[Arrays], watchdog: Watchdog | None = None) -> list[list[OutputTensor]]:
    """One onnxruntime call for all ``jobs`` (rows concatenated on axis 0), outputs split back per job."""
    feeds = {
        name: jobs[0][name] if len(jobs) == 1 else np.concatenate([j[name] for j in jobs], axis=0) for name in jobs[0]
    }
    options = watchdog.arm() if watchdog is not None else None
    try:
        outputs = model.session.run(model.output_names, feeds, options)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
        if watchdog is not None and options is not None and options.terminate:
            raise TimedOut(f"inference exceeded the job time limit of {watchdog.limit_s:g}s") from None
        raise InferenceError(f"onnxruntime failed: {exc}") from None
    finally:
        if watchdog is not None:
            watchdog.disarm()
    counts = [next(iter(j.values())).shape[0] for j in jobs]
    per_job: list[list[OutputTensor]] = [[] for _ in jobs]
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
    model: LoadedModel, jobs: list[Arrays], watchdog: Watchdog | None = None
) -> list[list[OutputTensor] | JobError]:
    """Run ``jobs`` together; if the batch fails, bisect so only the offending jobs get the error.
    A batch that ran out of time is not re-run: every job in it gets the same error."""
    try:
        return list(run_batch(model, jobs, watchdog))
    except TimedOut as error:
        return [error] * len(jobs)
    except InferenceError as error:
        if len(jobs) == 1:
            return [error]
    middle = len(jobs) // 2
    return run_isolating(model, jobs[:middle], watchdog) + run_isolating(model, jobs[middle:], watchdog)
