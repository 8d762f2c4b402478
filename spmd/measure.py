"""Measure one layout's compiled train step: compile time, step time, memory, collectives."""

import statistics
import time

import jax
import numpy as np

from spmd.hlo import census, collectives
from spmd.train_step import Trainer


def measure(trainer: Trainer, inputs: np.ndarray, targets: np.ndarray, steps: int = 5) -> dict:
    """Compile the step once (timed), run `steps` more after one warm-up, read the program."""
    params, opt_state = trainer.init(seed=0)
    x, y = trainer.place((inputs, targets))
    t0 = time.perf_counter()
    compiled = trainer.lower_step(params, opt_state, x, y).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()  # jax 0.10.2 CPU: a dict (older jax: a list of one dict)
    cost = (cost[0] if isinstance(cost, list | tuple) else cost) or {}
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        params, opt_state, metrics = trainer.step(params, opt_state, x, y)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:])
    return {
        "compile_s": compile_s,
        "step_s": step_s,
        "tokens_per_s": inputs.size / step_s,
        "temp_bytes_per_device": int(memory.temp_size_in_bytes),
        "argument_bytes_per_device": int(memory.argument_size_in_bytes),
        # Arguments + outputs + temporaries, less what donation aliases: the live peak XLA plans.
        "peak_bytes_per_device": int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                     + memory.temp_size_in_bytes - memory.alias_size_in_bytes),
        # Per device; XLA's cost analysis counts a while-loop body once (not x trip count).
        "flops_per_device": float(cost.get("flops", 0.0)),
        "collectives": census(collectives(compiled.as_text(), trainer.mesh)),
        "loss": float(metrics["loss"]),
    }
