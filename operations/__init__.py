"""Operator commands: queue and model status, and the dead-letter queue (list, replay).

They block (short-lived connections of their own, :func:`shared.connection.open_blocking`): call them
from a command or a worker thread, never from an I/O loop.
"""
