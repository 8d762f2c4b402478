"""The model's loss through a pipeline: embed → pipelined blocks → head + loss.

Two ways to run the blocks:
- training, every schedule (`gpipe`, `1f1b`, `interleaved`, `zb-h1`): the table-driven executor
  of `pipeline.executor`, which runs the forward and backward actions by hand in the schedule's
  order. The last stage needs dLoss/dy for each micro-batch as soon as its forward is done, so
  there the head and loss run inside the loop, on the last stage, in that micro-batch's F.
- `forward_only` (evaluation): the forward tick loop of `pipeline.gpipe`. Embedding and head run
  outside the loop (docs/design.md §1); the head runs per micro-batch, split over `stage` (stage
  as extra data parallelism there) whenever p divides m. `jax.grad` of this loop is GPipe too,
  the readable reference that the tests hold the executor to; it is not the training path
  because its transpose keeps every tick's residuals, bubble ticks included (slower than the
  executor's GPipe per gradient: README.md, "Pipeline").
The embedding always runs outside, on every stage (a gather: cheap to repeat).
"""

import functools

import jax
from flax import nnx

from tppjax.errors import ConfigError
from tppjax.models import ModelConfig, Transformer, cross_entropy
from tppjax.pipeline.executor import pipelined_loss
from tppjax.pipeline.gpipe import gpipe, to_microbatches, to_stages
from tppjax.pipeline.layout import StageLayout, balance, parse_stage_layers
from tppjax.pipeline.schedules import make_schedule, validate
from tppjax.pipeline.simulate import simulate
from tppjax.spmd.context import Context
from tppjax.spmd.rules import batch_shards


def check_pipeline(cfg: ModelConfig, tc, mesh_shape: dict[str, int], batch: int) -> None:
    """Pipeline settings that must hold before compiling; one line each. (Layers that do not
    divide by stages x virtual stages are balanced unevenly: `pipeline.layout`.)"""
    p, m, v = mesh_shape["stage"], tc.microbatches, tc.virtual_stages
    validate(make_schedule(tc.schedule, p, m, v))  # unknown name, v or m that the schedule refuses
    per_shard = batch // batch_shards(mesh_shape)
    if per_shard % m:
        raise ConfigError(
            f"the batch per data shard ({per_shard} = {batch} / data x fsdp) is not divisible "
            f"by --microbatches {m}; choose a divisor of {per_shard} or change --batch-size"
        )


def head_parts(model: Transformer):
    """(head params, head_fn(params, y, targets) → mean loss) for the executor's last stage."""
    head_def, head_state = nnx.split(model.head)
    tied = model.embedding[...] if model.cfg.tie_embeddings else None

    def head_fn(params, y, targets):
        state, embedding = params
        return cross_entropy(nnx.merge(head_def, state)(y, embedding), targets)

    return (head_state, tied), head_fn


def pipeline_loss(model: Transformer, inputs, targets, tc, stages: int, layout: StageLayout,
                  forward_only: bool = False, context: Context | None = None):
    """Same value as the unpipelined loss: the mean over the same global batch of tokens.

    The model's blocks are `layout`'s padded stack. `forward_only`: no backward will be taken
    (evaluation): run the forward loop of `gpipe`. `context`: context parallelism (inputs and
    targets laid out by it). Inside the pipeline's `shard_map` `context` is manual, as the data
    axes are, so each layer sees its shard's tokens and gradients are summed over `context`
    once per step; except where `tensor` splits the stages too (`context.gathered`): there a
    collective over manual `context` would gather the tensor-split heads whole (XLA), so
    `context` stays automatic and the gradients are summed over it once per micro-batch.
    """
    m, v = tc.microbatches, tc.virtual_stages
    sequence = None if context is None else context.sequence(inputs.shape[1])
    axis = None if context is None else context.pipeline_axis
    xs = to_microbatches(model.embed(inputs, sequence), m)  # (m, b_mb, T, D)
    block_def, stacked = nnx.split(model.blocks)
    if context is not None:  # the pipeline runs a layer as (params, x) -> y
        block_def = functools.partial(_layer, block_def, context)
    if not forward_only:
        head_params, head_fn = head_parts(model)
        return pipelined_loss(block_def, stacked, xs, to_microbatches(targets, m), head_fn,
                              head_params, make_schedule(tc.schedule, stages, m, v), tc.remat,
                              layout.counts, sequence_axis=axis)
    # GPipe's forward runs the canonical layout: stage s holds virtual stages s·v .. s·v+v-1.
    active = layout.active().reshape(stages, -1) if layout.padded else None
    ys = gpipe(block_def, to_stages(stacked, stages), xs, tc.remat, active, axis)  # (m, b_mb, T, D)
    # The head runs per micro-batch (vmap over m). When p divides m, ys comes back split over
    # `stage` along m, and `spmd_axis_name` keeps it so: each stage runs the head on m/p
    # micro-batches, with no reshuffle of rows between data shards.
    split = "stage" if m % stages == 0 else None
    logits = jax.vmap(model.logits, spmd_axis_name=split)(ys)  # (m, b_mb, T, V)
    return cross_entropy(logits, to_microbatches(targets, m))


def _layer(block_def, context: Context, params, x):
    """One layer on a context shard's tokens x (inside the pipeline)."""
    return nnx.merge(block_def, params)(x, context.sequence(x.shape[1]))


def stage_map(layout: StageLayout, schedule) -> list[list[range]]:
    """Per stage, per chunk, its layers (model indices): chunk c of stage s holds virtual
    stage `schedule.virtual_stage(s, c)`."""
    ranges = layout.ranges()
    return [[ranges[schedule.virtual_stage(s, c)] for c in range(schedule.virtual_stages)]
            for s in range(schedule.stages)]


def describe_pipeline(trainer) -> str:
    """The stage map and the schedule's simulated bubble, for the start of a run."""
    tc, p = trainer.tc, trainer.stages
    schedule = make_schedule(tc.schedule, p, tc.microbatches, tc.virtual_stages)
    sim = simulate(schedule)
    lines = [f"pipeline: {tc.schedule}, {p} stages x {tc.virtual_stages} virtual, "
             f"{tc.microbatches} micro-batches; simulated bubble fraction "
             f"{sim.bubble_fraction:.3f}, peak in-flight micro-batches {list(sim.peak_inflight)}"]
    for s, chunks in enumerate(stage_map(trainer.layout, schedule)):
        text = ", ".join(f"{r.start}..{r.stop - 1}" if r else "none" for r in chunks)
        lines.append(f"  stage {s}: layers {text}")
    return "\n".join(lines)


def head_cost(cfg: ModelConfig, seq_len: int) -> float:
    """The head and loss's forward FLOPs per token, in layers (the last virtual stage runs it):
    the output projection 2·D·V against a layer's 2·(its matmul weights) + attention 4·T·D."""
    d, f, h = cfg.d_model, cfg.d_ff, cfg.head_dim
    ins = 2 if cfg.style == "llama" else 1
    layer = 2 * (d * (cfg.n_heads + 2 * cfg.n_kv_heads) * h + cfg.n_heads * h * d
                 + d * ins * f + f * d) + 4 * seq_len * d
    return 2 * d * cfg.padded_vocab / layer


def stage_layout(cfg: ModelConfig, stages: int, virtual_stages: int, seq_len: int,
                 stage_layers: tuple[int, ...] | str | None = None,
                 device_of: list[int] | None = None) -> StageLayout:
    """The layout a run uses: `stage_layers` per virtual stage if given; "auto" or None with
    layers that do not divide evenly: `balance` (over the devices of `device_of`, the stage
    that holds each virtual stage); else even."""
    n = stages * virtual_stages
    if isinstance(stage_layers, str) and stage_layers != "auto":
        stage_layers = parse_stage_layers(stage_layers)
    if isinstance(stage_layers, (list, tuple)):
        stage_layers = tuple(stage_layers)
        if min(stage_layers, default=0) < 0:
            raise ConfigError(f"--stage-layers {','.join(map(str, stage_layers))} has a "
                              "negative count; give layers per virtual stage, 0 or more")
        if len(stage_layers) != n or sum(stage_layers) != cfg.n_layers:
            raise ConfigError(
                f"--stage-layers {','.join(map(str, stage_layers))} must give {n} numbers "
                f"(stages x virtual stages = {stages} x {virtual_stages}) that sum to the "
                f"{cfg.n_layers} layers; fix the list or use --stage-layers auto")
        return StageLayout(stage_layers)
    if stage_layers is None and cfg.n_layers % n == 0:
        return StageLayout((cfg.n_layers // n,) * n)
    return StageLayout(balance(cfg.n_layers, n, head_cost(cfg, seq_len), device_of))
