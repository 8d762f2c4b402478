"""Draw the train and eval loss curves of a run from its metrics file (one JSON object a line).

A door to `tppjax.cli.plot`, where the code is (the tests import it there).

    python scripts/plot.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout uninstalled

from tppjax.cli.plot import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
