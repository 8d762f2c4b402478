"""Benchmark layouts against one device on the same global batch, in one run.

A door to `tppjax.cli.bench`, where the code is (the tests import it there).

    python scripts/bench.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout uninstalled

from tppjax.cli.bench import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run())
