"""Token data: a corpus every machine has, deterministic batches, placement on the mesh.

The global batch of step i depends only on (seed, i) and the corpus, never on the mesh, so
every layout sees the same tokens in the same order and must produce the same loss curve.
"""

import dataclasses
import sysconfig
from pathlib import Path

import numpy as np

from models.config import ConfigError

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst"}
DEFAULT_CORPUS_BYTES = 8 << 20  # the first 8 MiB of the standard library: enough, loads fast


def stdlib_corpus(limit: int = DEFAULT_CORPUS_BYTES) -> np.ndarray:
    """Byte-level tokens from the Python standard library's own sources: no download needed."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    return np.frombuffer(b"".join(chunks)[:limit], np.uint8).astype(np.uint16)


def load_tokens(path: str | None) -> np.ndarray:
    """`None` → the stdlib corpus; a `.bin` → uint16 token ids; a text file or folder → bytes."""
    if path is None:
        return stdlib_corpus()
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--data {path}: no such file or folder; give a text file, a folder "
                          "of text files or a uint16 .bin of token ids")
    if p.is_file() and p.suffix == ".bin":
        return np.fromfile(p, np.uint16)
    files = [p] if p.is_file() else sorted(
        f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES
    )
    tokens = np.frombuffer(b"".join(f.read_bytes() for f in files), np.uint8).astype(np.uint16)
    if tokens.size == 0:
        raise ConfigError(f"--data {path}: found no text ({', '.join(sorted(TEXT_SUFFIXES))})")
    return tokens


@dataclasses.dataclass(frozen=True)
class Batches:
    """Random windows of `seq_len + 1` tokens; inputs are the first T, targets the last T."""

    tokens: np.ndarray
    batch_size: int
    seq_len: int
    seed: int

    def __post_init__(self):
        if self.tokens.size <= self.seq_len + 1:
            raise ConfigError(
                f"the data has {self.tokens.size} tokens, too few for --seq-len {self.seq_len}; "
                "give more data or a shorter --seq-len"
            )

    def __call__(self, step: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of step `step`: all rows of the global batch, or only `rows` (what
        one process reads in a multi-process run; the rows are the same as in the global batch)."""
        rng = np.random.default_rng((self.seed, step))
        starts = rng.integers(0, self.tokens.size - self.seq_len - 1, self.batch_size)
        if rows is not None:
            starts = starts[rows]
        windows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int32)
        return windows[:, :-1], windows[:, 1:]


def split_heldout(tokens: np.ndarray, fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """The last `fraction` of the corpus is held out for evaluation (never trained on)."""
    cut = int(tokens.size * (1 - fraction))
    return tokens[:cut], tokens[cut:]


def check_vocab(tokens: np.ndarray, vocab_size: int) -> None:
    top = int(tokens.max())
    if top >= vocab_size:
        raise ConfigError(
            f"the data holds token id {top} but vocab_size is {vocab_size}; "
            f"pass --vocab-size {top + 1} or more"
        )
