"""Measure layouts' compiled train steps (compile time, step time, memory, collectives), and the
time of each pipeline action alone, for the step time a schedule would take on real devices."""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tppjax.measure import census, hlo
from tppjax.spmd.train_step import Trainer


class Layout:
    """One layout's compiled train step, ready to time: `compile` reads the program (compile
    time, memory, collectives, FLOPs), `step` runs one more step and returns its seconds: wall
    clock, and the CPU time of all of the process's threads (every emulated device's work,
    without the time a device thread waits for the others at a collective)."""

    def __init__(self, trainer: Trainer, inputs: np.ndarray, targets: np.ndarray):
        self.trainer = trainer
        self.params, self.opt_state = trainer.init(seed=0)
        self.batch = trainer.place((inputs, targets))
        self.tokens = inputs.size

    def compile(self) -> dict:
        t0 = time.perf_counter()
        compiled = self.trainer.lower_step(self.params, self.opt_state, *self.batch).compile()
        compile_s = time.perf_counter() - t0
        memory = compiled.memory_analysis()
        cost = compiled.cost_analysis()  # jax 0.10.2 CPU: a dict (older jax: a list of one dict)
        cost = (cost[0] if isinstance(cost, list | tuple) else cost) or {}
        self.step()  # warm-up: the jit cache's own compile, first-touch allocations
        return {
            "compile_s": compile_s,
            "temp_bytes_per_device": int(memory.temp_size_in_bytes),
            "argument_bytes_per_device": int(memory.argument_size_in_bytes),
            # Arguments + outputs + temporaries, less what donation aliases: the live peak.
            "peak_bytes_per_device": int(memory.argument_size_in_bytes
                                         + memory.output_size_in_bytes
                                         + memory.temp_size_in_bytes - memory.alias_size_in_bytes),
            # Per device; XLA's cost analysis counts a while-loop body once (not x trip count).
            "flops_per_device": float(cost.get("flops", 0.0)),
            **executed(self.trainer, compiled.as_text()),
        }

    def step(self) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        self.params, self.opt_state, metrics = self.trainer.step(self.params, self.opt_state,
                                                                 *self.batch)
        jax.block_until_ready(metrics)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.loss = float(metrics["loss"])
        return wall, cpu


def measure(layouts: list[Layout], steps: int = 5) -> list[dict]:
    """Compile every layout, then time `steps` steps of each, taking turns: step k of every
    layout runs before step k+1 of any. On a shared machine one layout timed alone, then the
    next, drifts between back-to-back runs of the same layout (BENCHMARKS.md: step times are
    noisy between runs); in turns, every layout sees the same drift, so their ratios hold. Each
    layout's times are medians."""
    results = [layout.compile() for layout in layouts]
    times = [[] for _ in layouts]
    for _ in range(steps):
        for layout, seconds in zip(layouts, times, strict=True):
            seconds.append(layout.step())
    for layout, result, seconds in zip(layouts, results, times, strict=True):
        step_s = statistics.median(wall for wall, _ in seconds)
        result.update(step_s=step_s, cpu_s=statistics.median(cpu for _, cpu in seconds),
                      tokens_per_s=layout.tokens / step_s, loss=layout.loss)
    return results


def executed(trainer: Trainer, text: str) -> dict:
    """What the compiled step runs (`tppjax.measure.census`): collectives per op kind (executions and
    bytes per device per step, the mean over stages) and FLOPs of all devices by phase."""
    tc = trainer.tc
    where = (trainer.mesh, tc.schedule, tc.microbatches, tc.virtual_stages,
             trainer.layout.counts if trainer.padded else None)
    flops = census.flops(text, *where)
    return {"collectives": hlo.census(census.collectives(text, *where)),
            "executed_flops": sum(flops["dot"].values()),
            "executed_flops_by_phase": flops["dot"],
            "elementwise_flops": sum(flops["elementwise"].values())}


def _fastest_s(calls: dict, repeats: int) -> dict[str, float]:
    """Fastest wall time of each `name: (fn, args)` over `repeats` rounds, after one warm-up
    (which compiles). Rounds interleave the calls, so a burst of load from other processes
    slows them alike; the fastest run, not the median, because this machine is shared and the
    least disturbed run is the closest to the action alone (under load the median of one action
    moved between calls of one bench run far more than its minimum did)."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def time_actions(cfg, layers: int, b_mb: int, seq: int, remat: str = "none",
                 split: bool = False, repeats: int = 7) -> dict[str, float]:
    """Seconds of each pipeline action alone, for one micro-batch through `layers` layers.

    Why alone: on emulated CPU devices the stages share the cores, so a pipeline's step time
    shows its total work, not its bubbles. Timing F, B (and W when `split`) one at a time on
    one device, each its own jitted program, gives the per-action costs that the simulator
    turns into the step time of p real devices (`predict_step_s`). Unsplit, B is the whole
    backward; split (zero-bubble), B is the input gradient and W the weight gradient.
    """
    from flax import nnx

    from tppjax.models.transformer import Transformer
    from tppjax.pipeline.actions import StageActions

    with nnx.use_eager_sharding(False):  # one device: no mesh, so no sharding to apply
        block_def, stacked = nnx.split(Transformer(cfg, nnx.Rngs(0)).blocks)
    w = jax.tree.map(lambda a: a[:layers], stacked)
    x = jax.random.normal(jax.random.key(0), (b_mb, seq, cfg.d_model), cfg.dtype)
    act = StageActions(block_def, remat, split)
    forward, backward = jax.jit(act.forward), jax.jit(act.backward)
    y, stash = forward(w, x)  # the first trace also records what `backward` rebuilds
    g = jnp.ones_like(y)
    calls = {"F": (forward, (w, x)), "B": (backward, (w, stash, g))}
    if split:
        calls["W"] = (jax.jit(act.weight_grads), (w, backward(w, stash, g)[2]))
    return _fastest_s(calls, repeats)


def predict_lockstep_s(name: str, stages: int, microbatches: int, virtual_stages: int,
                       seconds: dict, stage_layers=None) -> float:
    """The step of this project's executor on p real devices: its ticks run in lockstep (every
    tick ends with the sends, which every stage joins), so a tick lasts as long as the slowest
    stage in it (the sum of its actions' costs where a slot holds several), Σ over ticks of max
    over stages. `predict_step_s` is the schedule's own makespan, each stage free to run ahead;
    the two differ where a tick mixes actions of unequal cost (1F1B's steady state: an F
    beside a B). `seconds`: {kind: s} for equal stages; with uneven stages (`stage_layers`,
    real layers per virtual stage) {n: {kind: s}} for a virtual stage of n layers (none for 0:
    a stage of padding only costs nothing)."""
    from tppjax.pipeline.schedules import SCHEDULED
    from tppjax.pipeline.table import layers_run, plan

    pl = plan(name, stages, microbatches, virtual_stages)
    cost = 0.0
    for kind in SCHEDULED:
        if stage_layers is None:
            each = seconds.get(kind, 0.0)
        else:
            each = np.vectorize(lambda n, kind=kind: seconds.get(int(n), {}).get(kind, 0.0))(
                layers_run(pl, stage_layers, kind))
        cost = cost + pl.table.runs[kind] * each
    return float(cost.max(1).sum())


def predict_step_s(schedule, seconds: dict[str, float], resolution: int = 1000) -> float:
    """The simulator's makespan of `schedule` with per-action costs in seconds.

    `pipeline.simulate` takes integer costs, so each cost is rounded in units of the cheapest
    action / `resolution` (an error of about 1/resolution); the makespan is converted back.
    """
    from tppjax.pipeline.simulate import simulate

    kinds = ("F", "B", "W") if schedule.split_backward else ("F", "B")
    unit = min(seconds[k] for k in kinds) / resolution
    ticks = simulate(schedule, {k: max(1, round(seconds[k] / unit)) for k in kinds}).ticks
    return ticks * unit
