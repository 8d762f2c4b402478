"""Where a training run starts: afresh, or (--resume) from the latest checkpoint of the run
saved in its checkpoint folder.

The order keeps what the user saved: a fresh run's refusals that need no model come first (the
folder locked, or holding checkpoints without --overwrite: `CheckpointManager.check_free`),
then the model is initialised (with --init-from-hf a read of every weight), and only then does
`CheckpointManager.open` delete what --overwrite replaces, so a load that fails has deleted
nothing. A seed left unset is 0 for a new run and the saved run's on --resume.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

from tppjax.errors import ConfigError
from tppjax.spmd.checkpoint import CheckpointManager, run_info
from tppjax.spmd.train_step import Trainer


@dataclasses.dataclass
class Start:
    """The state a run starts from, and its first step."""

    manager: CheckpointManager | None  # None without a checkpoint folder; the caller closes it
    params: Any
    opt_state: Any
    step: int  # 0, or the data_position of the checkpoint it resumes from
    seed: int


def start_run(trainer: Trainer, fresh: Callable[[int], tuple], checkpoint_dir: str | None, *,
              resume: bool, overwrite: bool, seed: int | None, keep: int, mesh_spec: str,
              tokenizer: str | None, note: Callable[[str], None]) -> Start:
    """The run's `Start`: `fresh(seed)`'s (params, opt_state) for a new run (or a resumed one
    with no checkpoint yet), else the latest checkpoint restored onto `trainer`. `tokenizer`
    (the text of the tokenizer.json the data goes through) is recorded with every checkpoint;
    `note` hears what a resumed run starts from."""
    if not checkpoint_dir:
        if resume:
            raise ConfigError("--resume needs --checkpoint-dir DIR (where the run was saved)")
        seed = 0 if seed is None else seed
        return Start(None, *fresh(seed), 0, seed)
    state = None
    if not resume:  # before open, so a bad --init-from-hf leaves --overwrite's checkpoints
        CheckpointManager.check_free(checkpoint_dir, overwrite)  # but refuse first
        seed = 0 if seed is None else seed
        state = fresh(seed)
    info = run_info(trainer.cfg, trainer.tc, mesh_spec, seed, tokenizer)
    manager = CheckpointManager.open(checkpoint_dir, info, keep=keep, overwrite=overwrite,
                                     resume=resume, lock=True)
    seed = manager.seed  # --resume without a seed: the saved run's
    latest = manager.latest_step() if resume else None
    try:  # any failure or Ctrl-C before the caller holds the manager: close it (and the lock)
        if latest is None:
            if resume:
                note(f"no checkpoint in {checkpoint_dir} yet: starting from step 0")
            return Start(manager, *(state or fresh(seed)), 0, seed)
        if latest + 1 >= trainer.tc.steps:  # a checkpoint after step N continues at step N + 1
            raise ConfigError(f"the run in {checkpoint_dir} has already done {latest + 1} "
                              f"steps of --steps {trainer.tc.steps}: nothing to train; pass "
                              f"--steps above {latest + 1} to continue it")
        params, opt_state, record = manager.restore(latest, trainer)
    except BaseException:
        manager.close()
        raise
    note(f"resumed from {manager.path(latest)}: continuing at step {record['data_position']}")
    return Start(manager, params, opt_state, record["data_position"], seed)
