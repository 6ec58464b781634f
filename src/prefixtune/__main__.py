"""``python -m prefixtune`` (and ``torchrun -m prefixtune``): the command line."""

import sys

from .cli import main

sys.exit(main())
