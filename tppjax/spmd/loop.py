"""The training loop: batches in, metrics out. Scripts print; this module only computes."""

import dataclasses
import math
import time
from collections.abc import Iterator

import jax
import numpy as np
from flax import nnx

from tppjax.spmd.data import Batches
from tppjax.spmd.train_step import Trainer


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    batch_size: int
    seq_len: int
    seed: int = 0
    eval_every: int = 50  # 0: never
    eval_batches: int = 4


def evaluate(trainer: Trainer, params, heldout: Batches, batches: int) -> float:
    """Mean loss over a fixed set of held-out batches (the same ones at every evaluation)."""
    losses = [trainer.eval_loss(params, *trainer.fetch(heldout, i)) for i in range(batches)]
    return float(np.mean([float(v) for v in losses]))


def train(
    trainer: Trainer, lc: LoopConfig, train_tokens: np.ndarray, heldout_tokens: np.ndarray,
    params=None, opt_state=None, start_step: int = 0,
) -> Iterator[tuple[dict, tuple]]:
    """Yield per step its metrics (step, loss, lr, grad_norm, tokens_per_s, step_s, and eval_loss
    every `eval_every` steps and at the last) and the new (params, opt_state).
    A NaN/Inf loss, gradient norm or eval loss raises FloatingPointError naming the step, before
    that state is yielded (so it is never checkpointed)."""
    if params is None:
        params, opt_state = trainer.init(lc.seed)
    batches = Batches(train_tokens, lc.batch_size, lc.seq_len, lc.seed)
    # Without evaluation the held-out part is never read, so it may be shorter than a sequence.
    heldout = (Batches(heldout_tokens, lc.batch_size, lc.seq_len, lc.seed + 1)
               if lc.eval_every else None)
    tokens_per_step = lc.batch_size * lc.seq_len
    last = trainer.tc.steps - 1
    for step in range(start_step, trainer.tc.steps):
        inputs, targets = trainer.fetch(batches, step)
        t0 = time.perf_counter()
        params, opt_state, metrics = trainer.step(params, opt_state, inputs, targets)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - t0
        record = {"step": step, **metrics, "tokens_per_s": tokens_per_step / elapsed,
                  "step_s": elapsed}
        if lc.eval_every and (step % lc.eval_every == 0 or step == last):
            record["eval_loss"] = evaluate(trainer, params, heldout, lc.eval_batches)
        check_finite(record)
        yield record, (params, opt_state)


def check_finite(record: dict) -> None:
    """A NaN/Inf loss or gradient norm (which poisons this step's update) or eval loss stops the
    run before this step's state can be checkpointed."""
    for name, what in (("loss", "loss"), ("grad_norm", "gradient norm"),
                       ("eval_loss", "eval loss")):
        if name in record and not math.isfinite(record[name]):
            raise FloatingPointError(f"{what} became {record[name]} at step {record['step']}")


def parameter_table(trainer: Trainer, params) -> list[tuple[str, tuple, tuple, str, tuple]]:
    """(path, global shape, logical axes, mesh spec, per-device shard shape) per parameter."""
    rows = []
    for path, var in nnx.to_flat_state(params):
        arr = var[...]
        logical = var.get_metadata().get("out_sharding") or ()
        spec = arr.sharding.spec
        shard = arr.sharding.shard_shape(arr.shape)
        rows.append(("/".join(map(str, path)), arr.shape, tuple(logical), str(spec), shard))
    return rows
