"""Explain where TP and PP act: per module, its shards and the collectives placed there.

A door to `tppjax.cli.explain`, where the code is (the tests import it there).

    python scripts/explain.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout uninstalled

from tppjax.cli.explain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
