"""Helpers for the operator-facing tests (a module of its own: conftest is not for importing)."""

from __future__ import annotations

import numpy as np
import onnx
import private_broker
from onnx import TensorProto, helper

FEATURES = 3
WEIGHTS = np.array([[1.0], [2.0], [3.0]], dtype=np.float32)


def tiny_model() -> bytes:
    """``Y = X @ W`` with X float32 [N, 3]: small, deterministic, built without scikit-learn."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "tiny",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor("W", TensorProto.FLOAT, [FEATURES, 1], WEIGHTS.flatten().tolist())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def free_port() -> int:
    """A loopback port nobody listens on right now (see :func:`private_broker.free_port`)."""
    return private_broker.free_port()
