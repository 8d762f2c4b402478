"""Token data: a corpus every machine has, deterministic batches, placement on the mesh.

The global batch of step i depends only on (seed, i) and the corpus, never on the mesh, so
every layout sees the same tokens in the same order and must produce the same loss curve.
"""

import dataclasses
import math
import sysconfig
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tppjax.errors import ConfigError

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst"}
DEFAULT_CORPUS_BYTES = 8 << 20  # the first 8 MiB of the standard library: enough, loads fast


def byte_tokens(text: bytes) -> np.ndarray:
    """Byte-level tokens: one id per byte of the (UTF-8) text."""
    return np.frombuffer(text, np.uint8).astype(np.uint16)


def stdlib_corpus(limit: int = DEFAULT_CORPUS_BYTES,
                  encode: Callable[[bytes], np.ndarray] = byte_tokens) -> np.ndarray:
    """Tokens of the Python standard library's own sources (the first `limit` bytes): no
    download needed."""
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
    return encode(b"".join(chunks)[:limit])


def load_tokens(path: str | None,
                encode: Callable[[bytes], np.ndarray] = byte_tokens) -> np.ndarray:
    """`None` → the stdlib corpus; a `.bin` → uint16 token ids; a text file or folder →
    `encode(text)`: bytes, or a tokenizer's ids (`--tokenizer`)."""
    if path is None:
        return stdlib_corpus(encode=encode)
    if not path.strip():  # Path("") is the current folder: it would read all text found there
        raise ConfigError("--data is empty; give a text file, a folder or a .bin, or leave it out "
                          "for the default corpus")
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--data {path}: no such file or folder; give a text file, a folder "
                          "of text files or a uint16 .bin of token ids")
    try:
        if p.is_file() and p.suffix == ".bin":
            size = p.stat().st_size
            if size % 2:  # numpy would silently drop the odd byte
                raise ConfigError(f"--data {path} has {size} bytes, an odd count: a .bin holds "
                                  "uint16 token ids (2 bytes each); is the file truncated?")
            tokens = np.fromfile(p, np.uint16)
        else:
            files = [p] if p.is_file() else sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES
            )
            tokens = encode(b"".join(f.read_bytes() for f in files))
    except OSError as err:
        raise ConfigError(f"--data {path}: cannot read {err.filename or path} ({err.strerror}); "
                          "check its permissions") from err
    if tokens.size == 0:
        what = "is empty" if p.is_file() else f"holds no text ({', '.join(sorted(TEXT_SUFFIXES))})"
        raise ConfigError(f"--data {path} {what}; give data of at least one sequence")
    return tokens


def tokens_needed(seq_len: int) -> int:
    """The fewest tokens `Batches` can sample from: a window is seq_len + 1 tokens and its start
    is drawn below size - seq_len - 1, so one more than a window."""
    return seq_len + 2


@dataclasses.dataclass(frozen=True)
class Batches:
    """Random windows of `seq_len + 1` tokens; inputs are the first T, targets the last T."""

    tokens: np.ndarray
    batch_size: int
    seq_len: int
    seed: int

    def __post_init__(self):
        need = tokens_needed(self.seq_len)
        if self.tokens.size < need:
            raise ConfigError(
                f"the data has {self.tokens.size} tokens, fewer than the {need} that --seq-len "
                f"{self.seq_len} needs; give more data or a shorter --seq-len"
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


HELDOUT = 0.05  # the share of the corpus held out for evaluation


def _part_sizes(total: int, fraction: float = HELDOUT) -> tuple[int, int]:
    cut = int(total * (1 - fraction))
    return cut, total - cut


def split_heldout(tokens: np.ndarray, fraction: float = HELDOUT) -> tuple[np.ndarray, np.ndarray]:
    """The last `fraction` of the corpus is held out for evaluation (never trained on)."""
    cut = _part_sizes(tokens.size, fraction)[0]
    return tokens[:cut], tokens[cut:]


def check_split(tokens: np.ndarray, seq_len: int, evaluate: bool, source: str) -> None:
    """Refuse, before anything compiles, data whose training part (or, when `evaluate`, its
    held-out part) is too short for one sequence, naming the sizes and the least that works."""
    need, used = tokens_needed(seq_len), 2 if evaluate else 1

    def enough(total: int) -> bool:
        return min(_part_sizes(total)[:used]) >= need

    if enough(tokens.size):
        return
    least = math.ceil(need / (HELDOUT if evaluate else 1 - HELDOUT))  # enough; int() may round
    while enough(least - 1):  # in the held-out part's favour: step down to the exact least
        least -= 1
    train, heldout = _part_sizes(tokens.size)
    parts, where, fix = f"{train} to train on", "", ""
    if evaluate:
        parts += f" and {heldout} held out ({HELDOUT:.0%})"
        where, fix = " in each part", " (or --eval-every 0: no held-out part needed)"
    raise ConfigError(
        f"{source} has {tokens.size} tokens: {parts}, but --seq-len {seq_len} needs {need}{where}; "
        f"give at least {least} tokens or a shorter --seq-len{fix}"
    )


def check_vocab(tokens: np.ndarray, vocab_size: int, source: str = "the data") -> None:
    """Token ids at or above vocab_size would index past the embedding (silently, under jit)."""
    top = int(tokens.max())
    if top >= vocab_size:
        raise ConfigError(
            f"{source} holds token id {top} but vocab_size is {vocab_size}; "
            f"pass --vocab-size {top + 1} or more"
        )
