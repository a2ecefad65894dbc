"""``python -m fedtrak.simulations.cli``: the ``fedtrak`` command."""

import sys

from fedtrak.simulations.cli import main

sys.exit(main())
