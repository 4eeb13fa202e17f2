"""``python -m dptrain`` is the ``dptrain`` command."""

import sys

from .cli import main

if __name__ == "__main__":  # not when a spawned worker (a sweep's process pool) imports it
    sys.exit(main())
