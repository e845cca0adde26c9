"""How a process is configured and what it says: one pydantic-settings class per process (``INFERQ_*``)
and structlog logging, JSON in production, with secrets redacted by a processor."""
