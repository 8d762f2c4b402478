"""Print a pipeline schedule's timeline and its simulated figures next to the closed forms.

A door to `tppjax.cli.schedule`, where the code is (the tests import it there).

    python scripts/schedule.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout uninstalled

from tppjax.cli.schedule import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
