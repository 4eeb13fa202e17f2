"""``python -m dptrain`` is the ``dptrain`` command."""

import sys

from .cli import main

sys.exit(main())
