"""A real inferq worker whose model kills the process on one poison input: a stand-in for a job that
crashes onnxruntime (a segfault, an abort). Run as a script by the fault tests, restarted as a
supervisor would restart a crashed worker."""

from __future__ import annotations

import os
import signal
import sys
import time
from functools import partial
from typing import Any

import numpy as np

from inferq.model_store.manifest import Manifest
from inferq.model_store.registry import Registry
from inferq.model_store.stores import open_model_store
from inferq.shared.config.logging import configure_logging
from inferq.shared.config.settings import WorkerSettings
from inferq.shared.results.stores import open_result_store
from inferq.worker.runner import LoadedModel, load_model
from inferq.worker.worker import Worker

POISON = 666.0
CRASH_EXIT = 70
SLOW = 555.0
"""A job with this value takes ``SLOW_S`` seconds to run."""
SLOW_S = 8.0
STUCK = 777.0
"""A job with this value never finishes (a run stuck in native code, for all the worker can tell)."""


class CrashingSession:
    """Wraps a real session; dies like a native crash when it sees the poison value."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def run(self, names: list[str], feeds: dict[str, np.ndarray], options: Any = None) -> Any:
        if any(np.any(v == POISON) for v in feeds.values()):
            os._exit(CRASH_EXIT)
        if any(np.any(v == STUCK) for v in feeds.values()):
            time.sleep(3600)
        if any(np.any(v == SLOW) for v in feeds.values()):
            time.sleep(SLOW_S)
        return self._session.run(names, feeds, options)


def crashing_loader(manifest: Manifest, data: bytes) -> LoadedModel:
    model = load_model(manifest, data)
    model.session = CrashingSession(model.session)
    return model


def main() -> int:
    """Drain mode; with ``--serve``, serve until SIGTERM (exit 1 when the grace time ran out)."""
    settings = WorkerSettings()
    configure_logging("info", "json")
    registry: Registry[LoadedModel] = Registry(open_model_store(settings.model_store), partial(crashing_loader))
    worker = Worker(settings, registry, open_result_store(settings.result_store), drain="--serve" not in sys.argv)
    signal.signal(signal.SIGTERM, lambda *_: worker.consumer.call_threadsafe(worker.request_stop))
    return 1 if worker.run().forced else 0


if __name__ == "__main__":
    sys.exit(main())
