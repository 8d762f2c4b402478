"""The model's loss through a pipeline: embed → pipelined blocks → head + loss.

Embedding and head run outside the loop (DESIGN section 1). The embedding is a cheap gather and
runs on every stage; the head's matmul and the loss run on micro-batches split over `stage`
(stage treated as extra data parallelism there) whenever p divides m.
"""

from flax import nnx
from flax.core import spmd as flax_spmd

from models import ConfigError, ModelConfig, Transformer, cross_entropy
from pipeline.gpipe import gpipe, to_microbatches, to_stages
from pipeline.schedules import make_schedule, validate
from pipeline.simulate import simulate

EXECUTORS = {"gpipe": gpipe}


def check_pipeline(cfg: ModelConfig, tc, mesh_shape: dict[str, int], batch: int) -> None:
    """Pipeline settings that must hold before compiling; one line each."""
    p, m = mesh_shape["stage"], tc.microbatches
    if tc.schedule not in EXECUTORS:
        from pipeline.schedules import SCHEDULES

        known = [s for s in SCHEDULES if s in EXECUTORS]
        raise ConfigError(
            f"unknown or not yet executable --schedule {tc.schedule!r}; choose from "
            f"{', '.join(known)} (`scripts/schedule.py` simulates {', '.join(SCHEDULES)})"
        )
    validate(make_schedule(tc.schedule, p, m, tc.virtual_stages))
    per_shard = batch // (mesh_shape["data"] * mesh_shape["fsdp"])
    if per_shard % m:
        raise ConfigError(
            f"the batch per data shard ({per_shard} = {batch} / data x fsdp) is not divisible "
            f"by --microbatches {m}; choose a divisor of {per_shard} or change --batch-size"
        )
    if tc.remat not in ("none", "layer", "stage"):
        raise ConfigError(f"unknown --remat {tc.remat!r}; choose none, layer or stage")


def pipeline_loss(model: Transformer, inputs, targets, tc, stages: int):
    """Same value as the unpipelined loss: the mean over the same global batch of tokens."""
    m = tc.microbatches
    xs = to_microbatches(model.embed(inputs), m)  # (m, b_mb, T, D)
    block_def, stacked = nnx.split(model.blocks)
    ys = EXECUTORS[tc.schedule](block_def, to_stages(stacked, stages), xs, tc.remat)
    ys = ys.reshape(-1, *ys.shape[2:])  # micro-batch-major (B, T, D)
    targets = to_microbatches(targets, m).reshape(targets.shape)
    if m % stages == 0:  # ys is split over `stage` along m: let the head use it that way
        rules = dict(flax_spmd.get_logical_axis_rules())
        rules["batch"] = ("stage", *rules["batch"])
        with flax_spmd.logical_axis_rules(tuple(rules.items())):
            return cross_entropy(model.logits(ys), targets)
    return cross_entropy(model.logits(ys), targets)


def stage_map(n_layers: int, stages: int) -> list[range]:
    per = n_layers // stages
    return [range(s * per, (s + 1) * per) for s in range(stages)]


def describe_pipeline(trainer) -> str:
    """The stage map and the schedule's simulated bubble, for the start of a run."""
    tc, p = trainer.tc, trainer.stages
    sim = simulate(make_schedule(tc.schedule, p, tc.microbatches, tc.virtual_stages))
    lines = [f"pipeline: {tc.schedule}, {p} stages, {tc.microbatches} micro-batches, "
             f"bubble fraction {sim.bubble_fraction:.3f} (= (p-1)/(m+p-1) for gpipe/1f1b)"]
    for s, layers in enumerate(stage_map(trainer.cfg.n_layers, p)):
        lines.append(f"  stage {s}: layers {layers.start}..{layers.stop - 1}")
    return "\n".join(lines)
