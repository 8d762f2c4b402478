"""Draw the pictures of docs/parallelism.md from the code: the mesh, the Megatron splits, one tick.

A door to `tppjax.cli.figures`, where the code is (the tests import it there).

    python scripts/figures.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout uninstalled

from tppjax.cli.figures import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
