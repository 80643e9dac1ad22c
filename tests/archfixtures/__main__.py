"""``python -m tests.archfixtures KIND OUT_DIR [--seed N] [--steps N]``: build one fixture."""

import sys

from .build import main

sys.exit(main())
