"""``python -m sgmft``: the same command line as the ``sgmft`` script (it belongs to the CLI layer)."""

import sys

from sgmft.cli import main

sys.exit(main())
