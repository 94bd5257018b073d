"""Kept for `make bench` (`python -m bench.core`): the suite now lives in bench/run.py.

.venv/bin/python -m bench.core [--quick] [--parts ...]   # same as python -m bench
"""

import sys

from bench.run import cli

if __name__ == "__main__":
    sys.exit(cli())
