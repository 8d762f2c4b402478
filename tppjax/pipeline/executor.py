"""One executor for any schedule table (gpipe, 1f1b, interleaved, zb-h1, ...), backward by hand.

What runs where and when is data: `pipeline.table` lowers the schedule to a per-tick table
(read its docstring for "what does stage s run at tick t, and where does its output go").
This file runs that table. `pipelined_loss` runs the whole step, forward AND backward
actions, inside one `jax.shard_map` that is manual over `stage` and the data axes (as
`pipeline.gpipe`; `tensor` stays automatic, so TP works inside each action): a `lax.scan`
over the ticks whose carry (`Carry`) is the stage's whole state. Each tick a stage reads its
row of the table and runs `forward`, `head`, `backward`, `weight_grads` (each under a
`lax.cond`, on the ticks its row says), then `communicate`s.

Each action does only its own work (`pipeline.actions`): F runs the stage forward once under
`jax.vjp` and stashes the pullback's residuals (less the weights); B rebuilds the pullback
from them and runs no forward; `remat` picks what the residuals are. The head (seeded with
1/m, so the loss is the mean over micro-batches) hands dLoss/dy to its own B. zb-h1 and the
other split schedules: B computes the input gradient and keeps, for each weight product, its
input and output gradient; W does only the weight-gradient matmuls.

Each data shard accumulates the gradients of its own mean loss through the loop; they are
averaged over the data axes once, after it (`pipelined_loss`, a `jax.custom_vjp`, hands them on).

Speed (measured on XLA CPU, BENCHMARKS.md): a `lax.cond` whose one branch writes into carried
buffers and whose other passes them through updates them in place; a `lax.switch` over three
or more branches, or two branches writing different buffers, copies every buffer every tick.
Hence one `lax.cond` per action, in the order F, head, B, W (`pipeline.slots` says why not B
first), and the sends last.
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tppjax.pipeline.actions import StageActions
from tppjax.pipeline.gpipe import DP, to_stages, vary, widen
from tppjax.pipeline.layout import StageLayout, check_fit, to_virtual_stages
from tppjax.pipeline.schedules import ActionKind, Schedule
from tppjax.pipeline.table import SENDS, Plan, Table, plan_of, sends

F, B, W, HEAD = ActionKind.F, ActionKind.B, ActionKind.W, ActionKind.HEAD


class Carry(NamedTuple):
    """One stage's state between ticks. Buffers are [slots, ...] (`pipeline.slots`); x and g
    have one slot more, NO_SLOT's, where a send that this stage does not receive lands."""

    x: jax.Array  # stage inputs: arrival → F
    g: jax.Array  # output gradients: arrival (or HEAD) → B
    stash: tuple  # F's residuals, one buffer per leaf: F → B
    kept: tuple  # split backward: what B keeps for W, one buffer per leaf
    y: jax.Array  # this tick's F output (sent at its end)
    dx: jax.Array  # this tick's B input gradient (sent at its end)
    dw: Any  # the stage's weight gradients, [v, ...] like its weights
    dhead: Any  # the head's gradients
    dxs: jax.Array  # [m + 1, ...]: virtual stage 0's input gradients, NO_SLOT's row last
    loss: jax.Array  # the sum of the micro-batches' losses / m


@dataclasses.dataclass(frozen=True)
class Stage:
    """What one stage's actions read and never change within the step."""

    weights: Any  # [v, layers, ...]: this stage's chunks
    head_params: Any
    head_fn: Any  # (head_params, y, targets) → a micro-batch's mean loss
    xs: jax.Array  # (m, b_mb, ...): micro-batches (virtual stage 0 reads them)
    targets: jax.Array
    actions: StageActions
    active: jax.Array | None  # [v, layers]: this stage's real layers (None: no padding)

    def chunk(self, c) -> tuple:
        """(weights, real layers or None) of chunk c. One chunk: a static index, so no copy
        of the stage's weights per tick."""
        return jax.tree.map(lambda a: a[c] if len(a) > 1 else a[0], (self.weights, self.active))


def _put(buffers: tuple, slot, values: tuple) -> tuple:
    return tuple(b.at[slot].set(a) for b, a in zip(buffers, values, strict=True))


def _add(acc, c, grads):
    return jax.tree.map(lambda a, d: a.at[c].add(d), acc, grads)


def forward(carry: Carry, row: Table, stage: Stage) -> Carry:
    """F: the chunk on its input (virtual stage 0: xs, else the slot it arrived in); stashes
    the residuals for B."""
    x = jnp.where(row.first == 1, stage.xs[row.microbatch], carry.x[row.x_read])
    w, active = stage.chunk(row.chunk[F])
    y, stash = stage.actions.forward(w, x, active)
    return carry._replace(y=y, stash=_put(carry.stash, row.stash_write, stash))


def head(carry: Carry, row: Table, stage: Stage) -> Carry:
    """The last virtual stage, after F: this micro-batch's loss, and dLoss/dy for its B."""
    m = stage.xs.shape[0]
    loss, pull = jax.vjp(lambda hp, y: stage.head_fn(hp, y, stage.targets[row.microbatch]),
                         stage.head_params, carry.y)
    dh, g = pull(vary(jnp.asarray(1.0 / m, loss.dtype)))
    return carry._replace(g=carry.g.at[row.g_write].set(g),
                          dhead=jax.tree.map(jnp.add, carry.dhead, dh),
                          loss=carry.loss + loss.astype(jnp.float32) / m)


def backward(carry: Carry, row: Table, stage: Stage) -> Carry:
    """B: the pullback rebuilt from F's stash, on the output gradient; keeps what W needs."""
    c = row.chunk[B]
    w, active = stage.chunk(c)
    stash = tuple(b[row.stash_read] for b in carry.stash)
    dw, dx, kept = stage.actions.backward(w, stash, carry.g[row.g_read], active)
    return carry._replace(dx=dx, dw=_add(carry.dw, c, dw), dxs=carry.dxs.at[row.dx_row].set(dx),
                          kept=_put(carry.kept, row.kept_write, kept))


def weight_grads(carry: Carry, row: Table, stage: Stage) -> Carry:
    """W: the weight-gradient matmuls from what B kept."""
    c = row.chunk[W]
    w, active = stage.chunk(c)
    dw = stage.actions.weight_grads(w, tuple(b[row.kept_read] for b in carry.kept), active)
    return carry._replace(dw=_add(carry.dw, c, dw))


def run_if(kind: ActionKind, action, carry: Carry, row: Table, stage: Stage) -> Carry:
    """`action` on the ticks where this stage's row runs `kind`, under its named scope (the
    census weights its ops by those ticks); else the carry passes through unchanged."""
    def run(carry):
        return vary(action(carry, row, stage))

    return jax.lax.cond(row.runs[kind] == 1, jax.named_scope(kind.scope)(run), lambda c: c,
                        carry)


def communicate(carry: Carry, row: Table, send_now: dict, pl: Plan, stage_axis: str) -> Carry:
    """The end of a tick: y and dx go where the table says. Each send in `send_now` (the ones
    this schedule uses, with this tick's flag) is a `ppermute` over all stages, or zeros on
    ticks where no stage receives by it; V's turn is a write into the stage's own buffer."""
    p = jax.lax.axis_size(stage_axis)
    to_next = [(i, (i + 1) % p) for i in range(p if pl.ring else p - 1)]
    x, g = carry.x, carry.g
    if pl.turn:
        x, g = x.at[row.x_turn].set(carry.y), g.at[row.g_turn].set(carry.dx)
    for kind, flag in send_now.items():
        buffer, down = SENDS[kind]
        perm = to_next if down else [(j, i) for i, j in to_next]
        with jax.named_scope(kind.scope):
            got = jax.lax.cond(flag, lambda v, perm=perm: jax.lax.ppermute(v, stage_axis, perm),
                               jnp.zeros_like, carry.y if buffer == "x" else carry.dx)
            if buffer == "x":
                x = x.at[row.arrive[kind]].set(got)
            else:
                g = g.at[row.arrive[kind]].set(got)
    return carry._replace(x=x, g=g)


def _buffer(n: int, like) -> jax.Array:
    """n slots. NaN at first: a slot read before the planner's write (a bubble leaking into real
    work) would turn the loss and every gradient into NaN."""
    fill = jnp.nan if jnp.issubdtype(like.dtype, jnp.floating) else 0
    return jnp.full((n, *like.shape), fill, like.dtype)


def _start(pl: Plan, stage: Stage) -> Carry:
    """The carry before the first tick, its buffers sized from one trace of F and B (which
    also fixes the layout of the pullback that B rebuilds)."""
    x0, m = vary(stage.xs[0]), stage.xs.shape[0]

    def probe(w, x, active):
        _, stash = stage.actions.forward(w, x, active)
        return stash, stage.actions.backward(w, stash, x, active)[2]

    w, active = stage.chunk(0)
    stash, kept = jax.eval_shape(probe, w, x0, active)
    zeros = functools.partial(jax.tree.map, jnp.zeros_like)
    return vary(Carry(
        x=_buffer(pl.slots["x"] + 1, x0), g=_buffer(pl.slots["g"] + 1, x0),
        stash=tuple(_buffer(pl.slots["stash"], a) for a in stash),
        kept=tuple(_buffer(pl.slots["kept"], a) for a in kept),
        y=jnp.zeros_like(x0), dx=jnp.zeros_like(x0), dw=zeros(stage.weights),
        dhead=zeros(stage.head_params), dxs=jnp.zeros((m + 1, *x0.shape), x0.dtype),
        loss=jnp.zeros((), jnp.float32)))


def _run(block_def, staged, head_fn, head_params, xs, targets, schedule, remat, active,
         stage_axis, dp, seq_axis):
    """Loss and gradients (blocks, head, inputs) of the whole pipelined step. `active`: None,
    or [virtual stage, slot] bools, False for the padding slots that every action skips.
    `stage_axis`, `dp`, `seq_axis`: the mesh axes that split the stages, the micro-batch rows
    and (or None) their tokens."""
    pl = plan_of(schedule)
    actions = StageActions(block_def, remat, pl.split)
    send_ticks = sends(pl)  # the sends this schedule uses, and their ticks

    rows = P(None, dp, seq_axis)  # xs, targets, dxs: (m, rows, tokens, ...)
    shards = (*dp, seq_axis) if seq_axis else dp  # each holds its own part of the batch

    @functools.partial(
        jax.shard_map, in_specs=(P(stage_axis), P(), rows, rows),
        out_specs=(P(stage_axis), P(), rows, P()), axis_names={stage_axis, *shards},
    )
    def loop(staged, head_params, xs, targets):
        # This stage's [v, L/(vp), ...] and the head, marked as differing per stage and per data
        # shard: each shard accumulates its own gradients (of its own mean loss) through the
        # loop, and they are averaged over the data axes once, after it, not once per tick.
        s = jax.lax.axis_index(stage_axis)
        mine = None if active is None else jnp.asarray(active)[jnp.asarray(pl.virtual)[s]]
        stage = Stage(vary(jax.tree.map(lambda a: a[0], staged)), vary(head_params), head_fn,
                      xs, targets, actions, mine)

        def tick(carry, per_tick):
            rows, flags = per_tick
            row = jax.tree.map(lambda a: a[s], rows)
            for kind, action in ((F, forward), (HEAD, head), (B, backward), (W, weight_grads)):
                if kind != W or pl.split:
                    carry = run_if(kind, action, carry, row, stage)
            return communicate(carry, row, flags, pl, stage_axis), None

        end, _ = jax.lax.scan(tick, _start(pl, stage), (pl.table, send_ticks))
        # Loss and gradients of the mean over shards of each shard's mean loss (equal tokens).
        mean_dp = functools.partial(jax.lax.pmean, axis_name=shards)
        return (jax.tree.map(lambda a: mean_dp(a)[None], end.dw),
                mean_dp(jax.lax.psum(end.dhead, stage_axis)),
                jax.lax.psum(widen(end.dxs[:-1]), stage_axis) / jax.lax.axis_size(shards),
                mean_dp(jax.lax.psum(end.loss, stage_axis)))

    return loop(staged, head_params, xs, targets)


def pipelined_loss(layer, layers, xs, targets, loss_fn, loss_params, schedule: Schedule,
                   remat: str = "none", stage_layers=None, stage_axis: str = "stage",
                   data_axes: tuple[str, ...] = DP, sequence_axis: str | None = None):
    """Pipeline any stack of layers: the mean over micro-batches i of
    loss_fn(loss_params, layers applied in order to xs[i], targets[i]), run by `schedule`.

    layer: the `nnx.GraphDef` of one layer, an NNX module mapping x to a y of x's shape, or a
    plain function (layer params, x) -> y; layers: its state (or params) stacked on a leading
    axis [L, ...] (`nnx.split` of a module built with `nnx.vmap`, or of the Transformer's
    `blocks`; for a function, any pytree of arrays).
    xs: (m, micro-batch rows, ...); targets: (m, ...). loss_fn(loss_params, y, targets[i]) →
    that micro-batch's mean loss, a scalar: the head goes here (`loss_params` may be ()).
    schedule: a value (`make_schedule`, `read_schedule_file`); its stages must be the mesh's
    `stage_axis`. Call it under `jax.set_mesh` of a mesh (`spmd.mesh.make_mesh`, or any mesh
    with those axis names): layers are split over `stage_axis`, micro-batch rows over
    `data_axes` (default this project's `data`, `fsdp`), other axes stay automatic inside a
    layer (this project's `tensor`). `sequence_axis` (context parallelism) splits each
    micro-batch's tokens (xs, targets: dimension 2) and is manual too: a layer sees its slots
    and communicates across them itself (`tppjax.spmd.context`), and the loss is the mean of
    every shard's mean, as over data shards.
    stage_layers: layers per virtual stage (model order, p·v numbers), for stages of unequal
    size; then `layers` is either the [L] stack or already padded to the slots of
    `pipeline.layout.StageLayout(stage_layers)`. Without it, L must divide by p·v.
    Zero-bubble schedules split each layer's backward exactly where its weight products go
    through `tppjax.models.project` (one product per weight); any other parameter's gradient
    (all of a plain function's) is computed whole in B, which is still correct.
    Differentiable in layers, loss_params and xs (custom_vjp; the schedule runs in the
    forward, and the backward scales the gradients it kept).
    """
    n_layers = jax.tree.leaves(layers)[0].shape[0]
    data_axes = (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)
    layout = None if stage_layers is None else StageLayout(tuple(stage_layers))
    check_fit(schedule, n_layers, xs.shape[0], layout, stage_axis,
              (*data_axes, sequence_axis) if sequence_axis else data_axes)
    active = layout.active() if layout is not None and layout.padded else None
    if active is not None and n_layers == layout.n_layers:
        layers = layout.pad(layers)
    if schedule.virtual_stages == 1:
        staged = jax.tree.map(lambda a: a[:, None], to_stages(layers, schedule.stages))
    else:
        staged = to_virtual_stages(layers, schedule, stage_axis)
    run = functools.partial(_run, layer, schedule=schedule, remat=remat, active=active,
                            stage_axis=stage_axis, dp=data_axes, seq_axis=sequence_axis)

    @jax.custom_vjp
    def f(staged, loss_params, xs, targets):
        return run(staged, loss_fn, loss_params, xs, targets)[3]

    def fwd(staged, loss_params, xs, targets):
        gw, gh, gx, loss = run(staged, loss_fn, loss_params, xs, targets)
        return loss, (gw, gh, gx)

    def bwd(res, ct):
        gw, gh, gx = res
        scale = lambda a: (a * ct).astype(a.dtype)  # noqa: E731
        return (jax.tree.map(scale, gw), jax.tree.map(scale, gh), scale(gx), None)

    f.defvjp(fwd, bwd)
    return f(staged, loss_params, xs, targets)
