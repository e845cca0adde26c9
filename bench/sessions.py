"""Model loading for the two reference workers (ideal pipeline and naive): the same ONNX files from the same
model store, with the session options inferq uses (one intra-op thread per process)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from inferq.model_store.local import LocalModelStore
from inferq.shared.contract.messages import DATATYPE_OF_NUMPY


@dataclass(frozen=True, slots=True)
class Session:
    """A loaded model: its session, input name, output names, and what a result reports about it."""

    session: ort.InferenceSession
    input_name: str
    output_names: list[str]
    version: int
    sha256: str


def system_arguments(description: str | None) -> argparse.Namespace:
    """The command line every benchmarked system takes from the driver."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--jobs-queue", required=True)
    parser.add_argument("--results-queue", required=True)
    parser.add_argument("--model-store", type=Path, required=True)
    parser.add_argument("--stats", type=Path, required=True)
    return parser.parse_args()


def load_sessions(model_store: Path) -> dict[str, Session]:
    """The latest version of every model in the store, as ready sessions keyed by model name."""
    store = LocalModelStore(model_store)
    sessions = {}
    for name in store.list_models():
        version = store.list_versions(name)[-1]
        manifest = store.read_manifest(name, version)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(
            store.read_model(name, version), sess_options=options, providers=["CPUExecutionProvider"]
        )
        outputs = [o.name for o in session.get_outputs()]
        sessions[name] = Session(session, manifest.inputs[0].name, outputs, version, manifest.sha256)
    return sessions


def tensor_json(name: str, array: npt.NDArray[Any]) -> dict[str, Any]:
    """An output array in the KServe V2 JSON form inferq results use."""
    return {
        "name": name,
        "shape": list(array.shape),
        "datatype": str(DATATYPE_OF_NUMPY[np.dtype(array.dtype)]),
        "data": array.reshape(-1).tolist(),
    }
