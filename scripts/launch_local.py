"""Run N copies of a JAX script on this machine as one multi-process job, over loopback.

A door to `tppjax.cli.launch_local`, where the code is (the tests import it there).

    python scripts/launch_local.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout uninstalled

from tppjax.cli.launch_local import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
