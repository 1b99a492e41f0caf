"""``python -m memfit.cli``: the same as the ``memfit`` console script."""

import sys

from memfit.cli import main

sys.exit(main())
