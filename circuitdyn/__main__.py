"""``python -m circuitdyn``: the `circuitdyn` command."""

import sys

from circuitdyn.cli import main

sys.exit(main())
