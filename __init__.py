"""The ``inferq`` command-line entry point."""
