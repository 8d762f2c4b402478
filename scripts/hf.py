"""Hugging Face Llama / GPT-2 folders: logits on any mesh, and train.py checkpoints out.

A door to `tppjax.cli.hf`, where the code is (the tests import it there): scripts/hf.py --help."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout uninstalled

from tppjax.cli.hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
