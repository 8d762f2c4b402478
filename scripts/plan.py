"""Plan a layout: the meshes, schedules, m, v and remat that N devices can run, ranked.

A door to `tppjax.cli.plan` (the code, which the tests import): python scripts/plan.py --help."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout uninstalled

from tppjax.cli.plan import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run())
