"""What an operator runs against a live deployment: queue, consumer and model status, and the dead-letter
queue (list, replay). Blocking calls on short-lived connections: never from an I/O loop."""
