"""``python -m sgmft.cli``."""

import sys

from sgmft.cli import main

sys.exit(main())
