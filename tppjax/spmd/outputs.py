"""The files a run writes besides its checkpoints: checked at start, never silently replaced.

A path that cannot take its file is refused before the work, not after it. An earlier run's
metrics or plot is replaced only with --overwrite; --resume appends to the metrics (after
dropping the lines of the steps it trains again) and draws the plot again. Imports no jax, so
the command lines check their outputs in milliseconds.
"""

import json
import os
from pathlib import Path

from tppjax.errors import ConfigError

# What matplotlib writes without extra packages; a path is checked against these at start, so a
# typo does not cost the whole run (matplotlib would refuse it only when it saves).
IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def output_error(option: str, path: str | None, suffixes: tuple = ()) -> str | None:
    """Why `path` cannot take the file that `option` writes (None: it can, or no path given):
    a folder, a missing or unwritable folder, or (with `suffixes`) an extension not among them.
    Checked at start, so the run does not fail after its work."""
    if path is None:
        return None
    p, parent = Path(path), Path(path).parent
    if p.is_dir():
        return f"{option} {path}: is a folder; give a file in an existing folder"
    if suffixes and p.suffix.lower() not in suffixes:
        return (f"{option} {path}: unsupported file type {p.suffix or '(none)'!r}; end the name "
                f"in one of {', '.join(suffixes)}")
    if not parent.is_dir():
        return (f"{option} {path}: its folder {parent} does not exist; give a file in an "
                "existing folder")
    if not os.access(parent, os.W_OK) or p.exists() and not os.access(p, os.W_OK):
        return f"{option} {path}: not writable; give a file in a folder you can write"
    return None


def output_dir_error(option: str, path: str | None) -> str | None:
    """Why folder `path` (created if missing) cannot be written (None: it can): it, or the
    nearest part of it that exists, is a file or not writable."""
    if path is None:
        return None
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return f"{option} {path}: {p} is a file; give a folder"
    if not os.access(p, os.W_OK):
        return f"{option} {path}: {p} is not writable; give a folder you can write"
    return None


def check_run_outputs(metrics: str | None, plot: str | None, profile_dir: str | None, *,
                      resume: bool, overwrite: bool, primary: bool = True) -> None:
    """Refuse (ConfigError) a path that cannot take what the training run writes during or
    after its work, and an earlier run's metrics or plot unless --resume or --overwrite says
    what to do with it. Only the primary process writes metrics and the plot."""
    problems = [output_dir_error("--profile-dir", profile_dir)]
    if primary:
        problems += [output_error("--metrics", metrics),
                     output_error("--plot", plot, IMAGE_SUFFIXES)]
        if not (resume or overwrite):  # an earlier run's record: never replaced
            resumed = {"--metrics": "append to it", "--plot": "draw it again"}
            problems += [f"{option} {path} already exists; give a new file, --resume to "
                         f"{resumed[option]} (continuing a checkpointed run) or --overwrite to "
                         "replace it"
                         for option, path in (("--metrics", metrics), ("--plot", plot))
                         if path and Path(path).exists()]
    for problem in filter(None, problems):
        raise ConfigError(problem)


def continue_metrics(path: str, start: int) -> int:
    """A resumed run appends to its metrics file; first the lines of steps `start` and later
    (written after the checkpoint it resumes from, and a last line cut short by a kill) go, so
    that no step is listed twice. Returns how many lines went."""
    file = Path(path)
    if not file.exists():
        return 0
    lines = file.read_bytes().splitlines(keepends=True)

    def stale(line: bytes) -> bool:
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            return not line.endswith(b"\n")
        return not line.endswith(b"\n") or isinstance(step, int) and step >= start

    kept = [line for line in lines if not stale(line)]
    if len(kept) < len(lines):
        partial = file.with_name(file.name + ".tmp")
        partial.write_bytes(b"".join(kept))
        os.replace(partial, file)  # never a half-written metrics file
    return len(lines) - len(kept)
