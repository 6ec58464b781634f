"""``python -m prefixtune`` (and ``torchrun -m prefixtune``): the command line."""

import sys

from prefixtune.cli import main

sys.exit(main())
