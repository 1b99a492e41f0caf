"""``python -m memfit``: the same as the ``memfit`` console script."""

import sys

from memfit.cli import main

sys.exit(main())
