"""``python -m eval`` and ``torchrun -m eval``: the same as the ``evaluate`` command."""

import sys

from eval.cli import main

sys.exit(main())
