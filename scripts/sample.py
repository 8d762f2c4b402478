"""Generate text from a scripts/train.py checkpoint or a Hugging Face Llama / GPT-2 folder.

A door to `tppjax.cli.sample`, where the code is (the tests import it there).

    python scripts/sample.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout uninstalled

from tppjax.cli.sample import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
