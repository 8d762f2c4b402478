"""Train a Transformer with data, tensor and pipeline parallelism on a named mesh.

A door to `tppjax.cli.train`, where the code is (the tests import it there).

    python scripts/train.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout uninstalled

from tppjax.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
