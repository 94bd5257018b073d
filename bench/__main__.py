"""`python -m bench`: see bench/run.py."""

import sys

from bench.run import cli

sys.exit(cli())
