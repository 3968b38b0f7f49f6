"""``python -m train`` and ``torchrun -m train``: the same as the ``train`` command."""

import sys

from train.cli import main

sys.exit(main())
