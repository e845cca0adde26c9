"""``python -m inferq``: the ``inferq`` command."""

from inferq.cli import main

main()
